// Runs a verified schedule on one rank of a pipeline communicator: moves
// activations and gradients with ringflow's point-to-point messages and asks
// a stage_runner to compute; records a Chrome trace of what ran when.
#pragma once

#include <chrono>
#include <cstddef>
#include <span>
#include <string>
#include <vector>

#include "ringflow/comm/communicator.hpp"
#include "ringflow/pipeline/schedule.hpp"
#include "ringflow/pipeline/verify.hpp"

namespace ringflow::pipeline {

/// The computation of the stages on one rank. The executor owns the
/// messages; the runner owns the tensors. Spans it returns must stay valid
/// until the next call on the same (stage, micro-batch).
class stage_runner {
 public:
  virtual ~stage_runner() = default;

  /// Called before the first instruction of each run (forward_only: an
  /// inference pass) and after the last.
  virtual void begin_run(const schedule& s) { (void)s; }
  virtual void end_run() {}

  /// Elements of the activation entering `stage` (its received input) for
  /// `mb`: the executor posts receives of this size before they are needed.
  virtual std::size_t input_elements(int stage, int mb) = 0;
  /// Elements of the activation leaving `stage` for `mb`.
  virtual std::size_t output_elements(int stage, int mb) = 0;

  /// Forward of (stage, mb). `input` is the received activation (empty for stage 0).
  virtual void forward(int stage, int mb, std::span<const float> input) = 0;
  /// The output of a finished forward, to send to the next stage.
  virtual std::span<const float> output(int stage, int mb) = 0;
  /// Gradient w.r.t. the stage input (and, unless `defer_weights`, the
  /// weights). `grad_output` is empty for the last stage (it has the loss).
  virtual void backward(int stage, int mb, std::span<const float> grad_output,
                        bool defer_weights) = 0;
  /// The deferred weight gradients of (stage, mb).
  virtual void backward_weight(int stage, int mb) = 0;
  /// The input gradient of a finished backward, to send to the previous stage.
  virtual std::span<const float> input_grad(int stage, int mb) = 0;
  /// REDUCE and STEP.
  virtual void reduce_grads() {}
  virtual void optimizer_step() {}
};

/// One span of time on one rank, for Chrome's trace viewer (ph "X").
struct trace_event {
  std::string name;      ///< "F1.3", "wait RA1.3", "REDUCE"
  std::string category;  ///< "forward", "backward", "backward_weight", "wait", "reduce", "step"
  double start_us = 0;   ///< microseconds since the executor's epoch
  double duration_us = 0;
  int stage = -1;
  int micro_batch = -1;
  op_kind op = op_kind::forward;  ///< for waits: the receive
};

/// What one run did on this rank.
struct run_stats {
  double seconds = 0;          ///< wall time of the run on this rank
  double compute_seconds = 0;  ///< time inside the runner's compute calls
  double wait_seconds = 0;     ///< time blocked in receives
  int peak_activations = 0;    ///< most (stage, micro-batch) activations held at once
};

/// Options of an executor.
struct executor_options {
  /// Record trace events (also on when RINGFLOW_TIMELINE is set).
  bool trace = false;
  /// Tags used are tag_base + ((mb * stages + boundary) * 2 + direction) mod
  /// the span, all within [tag_base, tag_base + tag_span) of the user range.
  int tag_base = 0;
  int tag_span = 8192;
};

/// Executes a schedule on rank comm.rank() of a pipeline whose ranks are
/// those of `comm` (comm.size() must equal s.ranks()). The schedule is
/// verified once, here; a bad one throws the verifier's usage_error on every
/// rank before any message is sent.
///
/// Receives are posted up to two compute instructions ahead, into buffers of
/// the sizes the runner announces; sends are buffered copies completed
/// lazily. Transfers between stages on the same rank are local copies.
/// @code
///   auto sched = pipeline::one_f_one_b(comm.size(), /*micro_batches=*/8);
///   pipeline::executor ex(comm, sched);
///   ex.run(runner);   // once per training step
/// @endcode
class executor {
 public:
  executor(communicator comm, schedule s, executor_options opts = {});

  /// Runs every instruction of this rank's program once.
  run_stats run(stage_runner& runner);

  const schedule& plan() const { return schedule_; }
  const verify_report& prediction() const { return report_; }
  const communicator& comm() const { return comm_; }
  /// Trace events of every run so far on this rank (when tracing).
  const std::vector<trace_event>& events() const { return events_; }
  void clear_events() { events_.clear(); }
  bool tracing() const { return trace_; }

  /// The tag of a message crossing from stage `boundary` to boundary + 1
  /// (direction 0: activation) or back (1: gradient).
  int tag_of(int boundary, int mb, int direction) const;

 private:
  communicator comm_;
  schedule schedule_;
  verify_report report_;
  executor_options opts_;
  bool trace_ = false;
  std::vector<trace_event> events_;
  std::chrono::steady_clock::time_point epoch_;
};

/// Writes the events of every rank of `comm` as one Chrome trace JSON file
/// (chrome://tracing, Perfetto): {"traceEvents": [{"ph": "X", "pid": rank,
/// ...}]}. Collective over `comm`: rank 0 gathers and writes; `pid_offset`
/// is added to each rank (e.g. the pipeline index x stages in a 2-D grid).
/// Throws ringflow::error when the file cannot be written.
void write_chrome_trace(const std::string& path, const communicator& comm,
                        const std::vector<trace_event>& events, int pid_offset = 0);

/// Chrome trace JSON for the given per-rank events (index = pid).
std::string chrome_trace_json(const std::vector<std::vector<trace_event>>& per_rank);

/// A measured run in the verifier's terms (times in microseconds from the
/// first event; compute events only), so ascii_grid and to_svg can draw
/// what really happened next to what was predicted.
/// @code
///   auto measured = pipeline::measured_report(sched, events_of_every_rank);
///   std::string svg = pipeline::to_svg(sched, measured, "1F1B, measured");
/// @endcode
verify_report measured_report(const schedule& s,
                              const std::vector<std::vector<trace_event>>& per_rank);

}  // namespace ringflow::pipeline
