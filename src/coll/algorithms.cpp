// The allreduce algorithm table (coll/algorithms.hpp), and what reads only
// the names: algo_name and parse_algo.
#include "ringflow/coll/algorithms.hpp"

#include <fmt/format.h>

#include <array>
#include <string>

#include "builtin_algorithms.hpp"
#include "ringflow/coll/cost_model.hpp"
#include "ringflow/core/error.hpp"

namespace ringflow {
namespace {

bool one_node_with_shm(const cluster_shape& s) { return s.shm && s.nodes == 1; }
bool several_nodes_of_several(const cluster_shape& s) {
  return s.nodes > 1 && s.ranks_per_node > 1;
}

// In the cost model's order of preference on a tie: simpler first.
constexpr algorithm_info table[] = {
    // id                      name                  label        aliases
    {algo::halving_doubling,
     "halving_doubling",
     "halv_dbl",
     {"hd", "rabenseifner"},
     true,
     nullptr,
     &detail::halving_doubling_cost,
     &detail::run_halving_doubling},
    {algo::ring, "ring", "ring", {"", ""}, true, nullptr, &detail::ring_cost, &detail::run_ring},
    {algo::recursive_doubling,
     "recursive_doubling",
     "rec_dbl",
     {"rd", ""},
     true,
     nullptr,
     &detail::recursive_doubling_cost,
     &detail::run_recursive_doubling},
    {algo::tree, "tree", "tree", {"", ""}, true, nullptr, &detail::tree_cost, &detail::run_tree},
    {algo::double_tree,
     "double_tree",
     "double_tree",
     {"dtree", ""},
     true,
     nullptr,
     &detail::double_tree_cost,
     &detail::run_double_tree},
    {algo::hierarchical,
     "hierarchical",
     "hierarchical",
     {"", ""},
     true,
     &several_nodes_of_several,
     &detail::hierarchical_cost,
     &detail::run_hierarchical},
    // Registered by the shm backend with its cost (ext::register_algorithm).
    {algo::shm, "shm", "shm", {"", ""}, true, &one_node_with_shm, nullptr, nullptr},
    // The backend's own allreduce (MPI_Allreduce): never picked, only asked for.
    {algo::native, "native", "native", {"", ""}, false, nullptr, nullptr, nullptr},
    {algo::automatic, "auto", "auto", {"automatic", ""}, false, nullptr, nullptr, nullptr},
};

// Every enum value has exactly one row.
constexpr bool complete() {
  if (std::size(table) != algo_count) return false;
  for (std::size_t v = 0; v < algo_count; ++v) {
    int rows = 0;
    for (const auto& r : table) rows += static_cast<std::size_t>(r.id) == v;
    if (rows != 1) return false;
  }
  return true;
}
static_assert(complete(), "every algo needs exactly one row in the algorithm table");

// Row index by enum value.
constexpr std::array<std::size_t, algo_count> index = [] {
  std::array<std::size_t, algo_count> ix{};
  for (std::size_t i = 0; i < std::size(table); ++i) ix[static_cast<std::size_t>(table[i].id)] = i;
  return ix;
}();

}  // namespace

std::span<const algorithm_info> allreduce_algorithms() noexcept { return table; }

const algorithm_info& algorithm_info_of(algo a) noexcept {
  const auto v = static_cast<std::size_t>(a);
  return table[index[v < algo_count ? v : static_cast<std::size_t>(algo::automatic)]];
}

std::string_view algo_name(algo a) noexcept {
  if (static_cast<std::size_t>(a) >= algo_count) return "unknown";
  return algorithm_info_of(a).name;
}

algo parse_algo(std::string_view text) {
  for (const auto& r : table) {
    if (text == r.name) return r.id;
    for (std::string_view alias : r.aliases) {
      if (!alias.empty() && text == alias) return r.id;
    }
  }
  std::string names;
  for (std::size_t v = 0; v < algo_count; ++v) {
    names += fmt::format("{}{}", names.empty() ? "" : ", ", algo_name(static_cast<algo>(v)));
  }
  throw usage_error(fmt::format("unknown algorithm '{}': use one of {}", text, names));
}

}  // namespace ringflow
