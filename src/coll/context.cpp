// Per-communicator context (node layout, rank 0's cost model and tuning
// table) and the automatic algorithm choice (ringflow::explain, which reports
// it, is in explain.cpp).
#include "ringflow/coll/context.hpp"

#include <fmt/format.h>
#include <unistd.h>

#include <cstring>
#include <mutex>
#include <set>

#include "core/cpus.hpp"
#include "ringflow/coll/broadcast.hpp"
#include "ringflow/coll/registry.hpp"
#include "ringflow/coll/ring.hpp"
#include "ringflow/core/error.hpp"
#include "ringflow/core/log.hpp"

namespace ringflow {
namespace detail {
namespace {

// What rank 0 found when it looked for a tuning table.
enum tuning_status : std::int32_t {
  tuning_off = 0,       // RINGFLOW_TUNING=off
  tuning_no_file = 1,   // no file at the path
  tuning_unusable = 2,  // corrupt or from another machine (rank 0 warned)
  tuning_no_ranks = 3,  // no table for this rank count
  tuning_follows = 4,   // tables for this rank count: a broadcast follows
};

// What every rank contributes to the exchange; only rank 0's model, node
// size and tuning table are used, so ranks with different files or
// environments still agree.
struct wire_record {
  char host[64];
  char origin[128];
  char tuning_path[256];
  std::int32_t node_size;  // RINGFLOW_NODE_SIZE; 0 unset, -1 malformed
  std::int32_t tuning;     // a tuning_status (rank 0's counts)
  std::int32_t shm_registered;
  std::int32_t autotune;  // RINGFLOW_AUTOTUNE: 1 on, 0 off, -1 malformed
  detail::cpu_mask cpus;  // the CPUs this rank may run on (core/cpus.hpp)
  double model[10];
};

// Warns once per process per message (contexts are built per communicator).
void warn_once(const std::string& message) {
  static std::mutex m;
  static std::set<std::string> said;
  std::lock_guard lock(m);
  if (said.insert(message).second) log::warn("{}", message);
}

// Rank 0: reads the tuning file; returns the status and keeps the file when
// it has tables for `ranks`.
tuning_status load_tuning(int ranks, std::string& path, std::optional<tuning_file>& file) {
  path = tuning_path();
  if (path.empty()) return tuning_off;
  try {
    file = read_tuning_file(path);
  } catch (const error& e) {
    warn_once(
        fmt::format("{}; choosing allreduce algorithms with the cost model instead", e.what()));
    file.reset();
    return tuning_unusable;
  }
  if (!file) return tuning_no_file;
  const std::string host = tuning_host();
  if (file->machine != host) {
    warn_once(fmt::format(
        "tuning table {} was measured on '{}', this is '{}': not using it (rerun ringflow-bench "
        "--tune here, or point RINGFLOW_TUNING elsewhere)",
        path, file->machine, host));
    file.reset();
    return tuning_unusable;
  }
  for (const auto& t : file->tables) {
    if (t.ranks == ranks) return tuning_follows;
  }
  return tuning_no_ranks;
}

std::string describe_shape(const cluster_shape& s) {
  return fmt::format("{} ranks ({} node{} x {})", s.ranks, s.nodes, s.nodes == 1 ? "" : "s",
                     s.ranks_per_node);
}

std::shared_ptr<comm_context> build_context(const communicator& comm) {
  transport& t = comm.raw();
  const int p = t.size(), r = t.rank();
  wire_record mine{};
  gethostname(mine.host, sizeof mine.host - 1);
  std::string env_problem, autotune_problem;
  try {
    mine.node_size = node_size_from_env();
  } catch (const error& e) {
    mine.node_size = -1;
    env_problem = e.what();
  }
  try {
    mine.autotune = first_use_enabled_by_env() ? 1 : 0;
  } catch (const error& e) {
    mine.autotune = -1;
    autotune_problem = e.what();
  }
  mine.shm_registered = ext::registered_algorithm(algo::shm) != nullptr ? 1 : 0;
  mine.cpus = detail::process_cpus();
  std::optional<tuning_file> tuning;
  if (r == 0) {
    const cost_model m = local_cost_model();
    std::strncpy(mine.origin, m.origin.c_str(), sizeof mine.origin - 1);
    const double v[10] = {m.intra.alpha,        m.intra.beta,       m.intra.large_alpha,
                          m.intra.large_from,   m.inter.alpha,      m.inter.beta,
                          m.inter.large_alpha,  m.inter.large_from, m.gamma,
                          m.oversubscribed_step};
    std::memcpy(mine.model, v, sizeof v);
    std::string path;
    mine.tuning = load_tuning(p, path, tuning);
    std::strncpy(mine.tuning_path, path.c_str(), sizeof mine.tuning_path - 1);
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
  if (root.autotune < 0) {
    throw usage_error(fmt::format("rank {}: rank 0's RINGFLOW_AUTOTUNE is malformed{}", r,
                                  autotune_problem.empty() ? "" : ": " + autotune_problem));
  }
  auto ctx = std::make_shared<comm_context>();
  ctx->first_use = root.autotune == 1;
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
  ctx->model.oversubscribed_step = root.model[9];
  ctx->model.origin = std::string(root.origin, strnlen(root.origin, sizeof root.origin));
  ctx->shape = {p, ctx->topo.node_count(), ctx->topo.max_node_size()};
  // Cores of the largest node: the union of its ranks' CPU sets (ranks
  // bound to one core each and unbound ranks both count right).
  for (const auto& node : ctx->topo.nodes) {
    if (static_cast<int>(node.size()) != ctx->shape.ranks_per_node) continue;
    detail::cpu_mask u;
    for (int q : node) u.merge(all[static_cast<std::size_t>(q)].cpus);
    ctx->shape.cores_per_node = std::max(ctx->shape.cores_per_node, u.count());
  }
  // shm: every rank has it registered, processes that can share memory
  // (the transport says so), and one host.
  bool one_host = true, registered = true;
  for (const auto& w : all) {
    one_host = one_host && std::strncmp(w.host, root.host, sizeof w.host) == 0;
    registered = registered && w.shm_registered != 0;
  }
  ctx->shape.shm =
      registered && one_host && t.processes_can_share_memory() && ctx->shape.nodes == 1;
  if (ctx->shape.shm && ctx->first_use) {
    // First-use tuning will try shm on some later call. Its set-up is a
    // handful of blocking MPI collectives; run here, where every rank is in
    // this exchange, a rank that failed or left before that later call cannot
    // leave the others waiting in them unbounded. (A count of 0 sets up and
    // reduces nothing; a segment that cannot be set up declines.)
    if (!ext::registered_algorithm(algo::shm)(comm, nullptr, nullptr, 0, dtype::f32,
                                              op_kind::sum)) {
      ctx->shm_declined.store(true, std::memory_order_relaxed);
    }
  }

  // Rank 0's table for exactly this shape, sent to the others as text.
  const std::string path(root.tuning_path, strnlen(root.tuning_path, sizeof root.tuning_path));
  ctx->table_origin = path;
  switch (root.tuning) {
    case tuning_off: ctx->table_note = "RINGFLOW_TUNING=off"; break;
    case tuning_no_file: ctx->table_note = fmt::format("no tuning file at {}", path); break;
    case tuning_unusable:
      ctx->table_note = fmt::format("{} is unusable (see the warning)", path);
      break;
    default:
      ctx->table_note = fmt::format("{} has no table for {}", path, describe_shape(ctx->shape));
  }
  if (root.tuning == tuning_follows) {
    std::string text;
    if (r == 0) {
      if (const tuning_table* mine_t = tuning->find(ctx->shape)) {
        tuning_file one;
        one.machine = tuning->machine;
        one.tables.push_back(*mine_t);
        text = one.to_json();
      }
    }
    std::uint64_t len = text.size();
    if (p > 1) broadcast_bytes(t, &len, sizeof len, 0, default_segment_bytes);
    text.resize(len);
    if (len > 0 && p > 1) broadcast_bytes(t, text.data(), len, 0, default_segment_bytes);
    if (len > 0) {
      tuning_file one = tuning_file::from_json(text, path);
      ctx->table = std::make_shared<const tuning_table>(std::move(one.tables.front()));
      ctx->table_note.clear();
    }
  }
  return ctx;
}

}  // namespace

const comm_context* context_of(const communicator& comm) {
  return &comm.slot<comm_context>([&] { return build_context(comm); });
}

bool comm_context::first_use_decides(std::size_t bytes) const {
  if (!first_use) return false;
  const tuning_table* t = table.get();
  return t == nullptr || !t->matches(shape) || !t->covers(bytes);
}

automatic_pick automatic_allreduce_pick(const communicator& comm, std::size_t bytes) {
  automatic_pick p;
  p.context = context_of(comm);
  const comm_context& ctx = *p.context;
  const cluster_shape shape = ctx.choice_shape();
  if (!ctx.first_use_decides(bytes)) {
    p.algorithm = fastest_algorithm(ctx.table.get(), ctx.model, shape, bytes);
    return p;
  }
  p.trial = ctx.tuner.next(comm.raw(), bytes, ctx.model, shape);
  p.algorithm = p.trial.algorithm;
  p.timed = p.trial.timed;
  return p;
}

void automatic_trial_done(const automatic_pick& p, double seconds) {
  if (p.timed && p.context) p.context->tuner.record(p.trial, seconds);
}

int automatic_calls_left(const communicator& comm, std::size_t bytes) {
  const comm_context* ctx = comm.find_slot<comm_context>();
  if (ctx == nullptr) return -1;
  if (comm.size() == 1 || bytes == 0 || !ctx->first_use_decides(bytes)) return 0;
  return ctx->tuner.calls_left(bytes);
}

algo automatic_after_shm_declined(const communicator& comm, std::size_t bytes) {
  const comm_context* ctx = context_of(comm);
  ctx->shm_declined.store(true, std::memory_order_relaxed);
  return fastest_algorithm(ctx->table.get(), ctx->model, ctx->choice_shape(), bytes);
}

}  // namespace detail

}  // namespace ringflow
