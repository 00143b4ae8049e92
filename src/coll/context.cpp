// Per-communicator context (node layout, rank 0's cost model), the automatic
// algorithm choice and ringflow::explain.
#include "ringflow/coll/context.hpp"

#include <fmt/format.h>
#include <unistd.h>

#include <cstring>
#include <map>
#include <mutex>

#include "ringflow/coll/ring.hpp"
#include "ringflow/core/error.hpp"

namespace ringflow {
namespace detail {
namespace {

// What every rank contributes to the exchange; only rank 0's model and node
// size are used, so ranks with different files or environments still agree.
struct wire_record {
  char host[64];
  char origin[128];
  std::int32_t node_size;  // RINGFLOW_NODE_SIZE; 0 unset, -1 malformed
  std::int32_t reserved;
  double model[9];
};

struct cache_entry {
  std::shared_ptr<const comm_context> context;
  std::uint64_t last_seq = 0;
};
std::mutex cache_mutex;
std::map<const transport*, cache_entry>& cache() {
  static std::map<const transport*, cache_entry> c;
  return c;
}

std::shared_ptr<const comm_context> build_context(const communicator& comm) {
  transport& t = comm.raw();
  const int p = t.size(), r = t.rank();
  wire_record mine{};
  gethostname(mine.host, sizeof mine.host - 1);
  std::string env_problem;
  try {
    mine.node_size = node_size_from_env();
  } catch (const error& e) {
    mine.node_size = -1;
    env_problem = e.what();
  }
  if (r == 0) {
    const cost_model m = local_cost_model();
    std::strncpy(mine.origin, m.origin.c_str(), sizeof mine.origin - 1);
    const double v[9] = {m.intra.alpha,       m.intra.beta,       m.intra.large_alpha,
                         m.intra.large_from,  m.inter.alpha,      m.inter.beta,
                         m.inter.large_alpha, m.inter.large_from, m.gamma};
    std::memcpy(mine.model, v, sizeof v);
  }
  std::vector<wire_record> all(static_cast<std::size_t>(p));
  if (p > 1) {
    ring_allgather(t, reinterpret_cast<const std::uint8_t*>(&mine),
                   reinterpret_cast<std::uint8_t*>(all.data()), all.size() * sizeof(wire_record),
                   default_segment_bytes);
  } else {
    all[0] = mine;
  }
  const wire_record& root = all[0];
  if (root.node_size < 0) {
    throw usage_error(fmt::format("rank {}: rank 0's RINGFLOW_NODE_SIZE is malformed{}", r,
                                  env_problem.empty() ? "" : ": " + env_problem));
  }
  auto ctx = std::make_shared<comm_context>();
  if (root.node_size > 0) {
    ctx->topo = topology::blocks(p, root.node_size);
  } else {
    std::vector<std::string> names;
    for (const auto& w : all) names.emplace_back(w.host, strnlen(w.host, sizeof w.host));
    ctx->topo = topology::from_names(names);
  }
  ctx->model.intra = {root.model[0], root.model[1], root.model[2], root.model[3]};
  ctx->model.inter = {root.model[4], root.model[5], root.model[6], root.model[7]};
  ctx->model.gamma = root.model[8];
  ctx->model.origin = std::string(root.origin, strnlen(root.origin, sizeof root.origin));
  ctx->shape = {p, ctx->topo.node_count(), ctx->topo.max_node_size()};
  return ctx;
}

}  // namespace

std::shared_ptr<const comm_context> context_of(const communicator& comm, std::uint64_t seq) {
  const transport* key = &comm.raw();
  {
    std::lock_guard lock(cache_mutex);
    auto it = cache().find(key);
    if (it != cache().end() && it->second.last_seq < seq && it->second.context->shape.ranks == comm.size()) {
      it->second.last_seq = seq;
      return it->second.context;
    }
  }
  auto ctx = build_context(comm);
  std::lock_guard lock(cache_mutex);
  cache()[key] = cache_entry{ctx, seq};
  return ctx;
}

void forget_context(const communicator& comm) noexcept {
  std::lock_guard lock(cache_mutex);
  cache().erase(&comm.raw());
}

algo automatic_allreduce_algo(const communicator& comm, std::size_t bytes, std::uint64_t seq) {
  const auto ctx = context_of(comm, seq);
  return fastest_algorithm(ctx->model, ctx->shape, bytes);
}

}  // namespace detail

explanation explain(const communicator& comm, std::size_t bytes, dtype /*type*/) {
  const std::uint64_t seq = comm.next_sequence();
  if (seq == 0) detail::forget_context(comm);
  if (comm.size() == 1) {
    cost_model m = local_cost_model();
    return choose_algorithm(m, cluster_shape{}, bytes);
  }
  const auto ctx = detail::context_of(comm, seq);
  return choose_algorithm(ctx->model, ctx->shape, bytes);
}

}  // namespace ringflow
