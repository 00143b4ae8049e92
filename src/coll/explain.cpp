// ringflow::explain: the automatic choice for one size on one communicator,
// from the communicator's context (coll/context.hpp): rank 0's tuning table
// or cost model, or what first-use tuning measured or will measure.
#include "ringflow/coll/explain.hpp"

#include <fmt/format.h>

#include <string>

#include "ringflow/coll/context.hpp"
#include "ringflow/coll/first_use.hpp"

namespace ringflow {
namespace {

// "4 KiB", "1 MiB", "513 B": the size-class bounds in the first-use note.
std::string human_bytes(std::size_t b) {
  if (b >= (1u << 20) && b % (1u << 20) == 0) return fmt::format("{} MiB", b >> 20);
  if (b >= 1024 && b % 1024 == 0) return fmt::format("{} KiB", b >> 10);
  return fmt::format("{} B", b);
}

}  // namespace

explanation explain(const communicator& comm, std::size_t bytes, dtype /*type*/) {
  if (comm.size() == 1) {
    cost_model m = local_cost_model();
    return choose_algorithm(m, cluster_shape{}, bytes);
  }
  const detail::comm_context* ctx = detail::context_of(comm);
  const cluster_shape shape = ctx->choice_shape();
  explanation e = choose_algorithm(ctx->table.get(), ctx->table_origin, ctx->model, shape, bytes,
                                   ctx->table_note);
  if (bytes == 0 || !ctx->first_use_decides(bytes)) return e;
  const auto done = ctx->tuner.settled(bytes);
  const int cls = detail::first_use_class(bytes);
  const std::size_t lo = cls == 0 ? 0 : std::size_t{1} << (cls - 1);  // exclusive
  const std::size_t hi = std::size_t{1} << cls;
  if (!done) {
    const int left = ctx->tuner.calls_left(bytes);
    const auto cand = detail::first_use_candidates(ctx->model, shape, bytes);
    std::string names;
    for (algo a : cand) names += fmt::format("{}{}", names.empty() ? "" : ", ", algo_name(a));
    e.first_use_note = fmt::format(
        "first-use tuning: the {} allreduces of over {} up to {} try {} ({} rounds of 1 untimed "
        "and "
        "{} timed calls each), then run the fastest",
        left < 0 ? fmt::format("first {}", static_cast<int>(cand.size()) *
                                                   (detail::first_use_block(bytes) + 1) *
                                                   detail::first_use_rounds(bytes) +
                                               1)
                 : fmt::format("next {}", left),
        human_bytes(lo), human_bytes(hi), names, detail::first_use_rounds(bytes),
        detail::first_use_block(bytes));
    return e;
  }
  explanation m;
  m.bytes = bytes;
  m.shape = shape;
  m.model_origin = ctx->model.origin;
  m.table_note = ctx->table_note;
  m.from_first_use = true;
  m.first_use_rounds = done->rounds;
  m.first_use_block = done->block;
  m.first_use_kept_model = done->kept_model_pick;
  m.candidates = done->medians;
  m.choice = done->choice;
  m.predicted_s = m.candidates.front().seconds;
  const auto& second = m.candidates.size() > 1 ? m.candidates[1] : m.candidates[0];
  m.runner_up = second.algorithm;
  m.runner_up_s = second.seconds;
  return m;
}

}  // namespace ringflow
