// Node layouts: consecutive blocks (RINGFLOW_NODE_SIZE) or equal host names.
#include "ringflow/coll/topology.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <charconv>
#include <cstdlib>
#include <map>
#include <string_view>

#include "ringflow/core/env.hpp"
#include "ringflow/core/error.hpp"

namespace ringflow {

int topology::max_node_size() const {
  std::size_t m = 0;
  for (const auto& n : nodes) m = std::max(m, n.size());
  return static_cast<int>(m);
}

std::string topology::describe() const {
  std::size_t lo = node_of.size(), hi = 0;
  for (const auto& n : nodes) {
    lo = std::min(lo, n.size());
    hi = std::max(hi, n.size());
  }
  const std::string per = lo == hi ? fmt::format("{}", hi) : fmt::format("{}..{}", lo, hi);
  return fmt::format("{} node{} x {} rank{}{}", nodes.size(), nodes.size() == 1 ? "" : "s", per,
                     hi == 1 ? "" : "s", emulated ? " (emulated, RINGFLOW_NODE_SIZE)" : "");
}

topology topology::blocks(int ranks, int node_size) {
  if (node_size < 1) throw usage_error(fmt::format("node size {} must be at least 1", node_size));
  topology t;
  t.emulated = true;
  for (int r = 0; r < ranks; ++r) {
    const int node = r / node_size;
    if (node == t.node_count()) t.nodes.emplace_back();
    t.nodes.back().push_back(r);
    t.node_of.push_back(node);
  }
  return t;
}

topology topology::from_names(const std::vector<std::string>& names) {
  topology t;
  std::map<std::string, int> index;
  for (std::size_t r = 0; r < names.size(); ++r) {
    auto [it, fresh] = index.emplace(names[r], t.node_count());
    if (fresh) t.nodes.emplace_back();
    t.nodes[static_cast<std::size_t>(it->second)].push_back(static_cast<int>(r));
    t.node_of.push_back(it->second);
  }
  return t;
}

int node_size_from_env() {
  // Ranks per emulated node; 0: unset.
  return static_cast<int>(
      env::integer("RINGFLOW_NODE_SIZE", 0, {1, 1 << 20}, env::malformed::fail));
}

}  // namespace ringflow
