// What both bucketed trainers (data_parallel, sharded_data_parallel) do the
// same way, private to src/train: the per-step bookkeeping of which
// parameters reported a gradient and which buckets may launch, the uneven-
// inputs count of contributing ranks, the timed bucket job on the progress
// thread, and the same-model check at construction. The trainers differ in
// what a bucket's job does (allreduce or a hook; reduce-scatter) and in where
// the gradients live.
#pragma once

#include <cstddef>
#include <cstdint>
#include <exception>
#include <initializer_list>
#include <span>
#include <string_view>
#include <utility>
#include <vector>

#include "ringflow/ad/parameter_store.hpp"
#include "ringflow/coll/async.hpp"
#include "ringflow/coll/extension.hpp"
#include "ringflow/comm/communicator.hpp"
#include "ringflow/train/data_parallel.hpp"
#include "ringflow/train/timeline.hpp"

namespace ringflow::train::detail {

/// Where a bucket's job ran on the progress thread (microseconds, now_us()).
struct span_record {
  double start_us = 0;
  double end_us = 0;
};

/// Runs job(c) on comm's progress thread, in order with its other
/// collectives, timing it into *rec and, when the trace is on, recording a
/// comm-lane event of `step` that describe(e) names (called on the progress
/// thread after the job, so it may read what the job wrote).
template <class Job, class Describe>
collective_handle enqueue_timed(const communicator& comm, span_record* rec, const timeline& trace,
                                std::int64_t step, Job job, Describe describe) {
  return ext::enqueue(comm, [rec, trace, step, job = std::move(job),
                             describe = std::move(describe)](const communicator& c) mutable {
    const double t0 = now_us();
    job(c);
    const double t1 = now_us();
    rec->start_us = t0;
    rec->end_us = t1;
    if (trace.enabled()) {
      trace_event e;
      e.lane = lane::comm;
      e.start_us = t0;
      e.duration_us = t1 - t0;
      e.step = step;
      describe(e);
      trace.record(std::move(e));
    }
  });
}

/// Seconds spent in the jobs of `records`.
double busy_seconds(std::span<const span_record> records);

/// The per-step state of a bucketed trainer: which parameters reported a
/// gradient (or accumulated one under no_sync), how many each bucket still
/// waits for, the next bucket to launch (buckets launch strictly in order, so
/// every rank queues the same sequence), and the uneven-inputs count.
/// `who` ("train::data_parallel") starts every error message.
struct step_tracker {
  explicit step_tracker(std::string_view trainer) : who(trainer) {}

  std::string_view who;
  // Fixed at construction (plan()).
  int rank = 0;
  std::vector<std::size_t> bucket_of;    // parameter -> bucket
  std::vector<bool> expected;            // requires_grad when built
  std::vector<std::size_t> expected_in;  // per bucket: expected parameters
  // Per step.
  std::vector<std::uint32_t> fired;
  std::vector<bool> accumulated;  // got a gradient in a no_sync backward this step
  bool no_sync = false;
  std::size_t accumulated_backwards = 0;
  std::vector<std::size_t> pending;
  std::size_t next = 0;  // first bucket not launched
  std::int64_t step = 0;
  // Uneven inputs: this rank's share of the step's "still training" count
  // (0 once joined) and the count's sum, written by the flag allreduce on the
  // progress thread before any bucket of the step runs there.
  std::int32_t contribution = 1;
  std::int32_t contributors = 0;
  bool flag_launched = false;
  collective_handle flag_handle;

  /// Maps the parameters of `buckets` to them on rank `r` (named in the
  /// errors); a parameter is expected when it requires a gradient now.
  void plan(const std::vector<bucket>& buckets, const ad::parameter_store<float>& params, int r);
  /// The start of a step: nothing fired, every bucket waits for all.
  void reset();

  /// Parameter i reported its gradient. Throws usage_error when it was not
  /// expected or reported twice this step; returns false under no_sync (the
  /// gradient keeps accumulating in place), true when it counts.
  bool count_ready(std::size_t i, const ad::parameter_store<float>& params);
  /// One fewer parameter for i's bucket; true when it has them all (it
  /// launches once the buckets before it have).
  bool bucket_done(std::size_t i) { return --pending[bucket_of[i]] == 0; }
  /// A parameter that got no gradient this step contributes zero: zeroes
  /// its slice of `grads` (indexed like the parameters' offsets minus `base`).
  void zero_missing(const bucket& bk, const ad::parameter_store<float>& params,
                    std::span<float> grads, std::size_t base = 0) const;
  /// Whether anything of this step happened yet (a backward, a launch).
  bool started() const;

  /// Queues the step's count of contributing ranks ahead of its first
  /// bucket: the progress thread runs in queue order, so every bucket of the
  /// step reads the finished count (the same on every rank).
  void launch_flag(const communicator& comm);
  /// join(): checks it may run now (options_name::uneven_inputs on, not in
  /// no_sync, not mid-step; usage_error otherwise), then sends a zero
  /// contribution. False when every rank has joined (the uneven epoch is
  /// over, the count is reset); true when others still train, and the caller
  /// runs a step with zero gradients.
  bool join_round(const communicator& comm, bool uneven_inputs, std::string_view options_name);
  /// The ranks that contributed to the step just reduced.
  int contributing(const communicator& comm, bool uneven_inputs) const {
    return uneven_inputs ? contributors : comm.size();
  }

  /// Waits for the flag (when launched) and for every handle; returns the
  /// first failure (every handle is waited for even so).
  std::exception_ptr wait_step(std::initializer_list<std::span<collective_handle>> handles);
  /// The same from a destructor: failures are logged, not thrown.
  void wait_quietly(std::initializer_list<std::span<collective_handle>> handles) noexcept;
};

/// FNV-1a over the parameter names and sizes: equal on every rank that
/// built the same model.
std::uint64_t layout_hash(const ad::parameter_store<float>& params);

/// Throws usage_error on every rank when the ranks' `hash` (layout_hash of
/// `params`, perhaps mixed with more) differ. The trainers' first async call,
/// so it also starts the progress thread at the same point on every rank.
void check_same_model(const communicator& comm, const ad::parameter_store<float>& params,
                      std::uint64_t hash, std::string_view who);

}  // namespace ringflow::train::detail
