// Per-rank Chrome trace (chrome://tracing, Perfetto) of a training run: spans on a compute lane and
// a communication lane.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace ringflow::train {

/// Which row of the trace a span lands on (the trace's `tid`).
enum class lane : int {
  compute = 0,  ///< the training thread: forward, backward, waiting, optimizer
  comm = 1,     ///< the progress thread: each bucket's allreduce
};

/// One complete span ("ph": "X"). Times are microseconds on the system clock
/// (so the files of several ranks on one host line up).
struct trace_event {
  std::string name;
  train::lane lane = lane::compute;
  double start_us = 0;
  double duration_us = 0;
  std::int64_t step = -1;    ///< training step the span belongs to (-1: none)
  std::int64_t bucket = -1;  ///< bucket index for allreduce spans (-1: none)
  std::int64_t bytes = -1;   ///< bytes reduced, for allreduce spans (-1: none)
  int rank = 0;              ///< the trace's `pid`

  double end_us() const { return start_us + duration_us; }
};

/// `path` with the rank inserted before the extension:
/// "trace.json" -> "trace.rank3.json", "out/trace" -> "out/trace.rank3.json".
std::filesystem::path rank_file(const std::filesystem::path& path, int rank);

/// Microseconds on the clock the spans use (monotonic, offset to system time).
double now_us();

/// A thread-safe recorder of spans for one rank; a cheap handle (copies share
/// it). A default-constructed timeline is disabled: record() is a no-op.
///
/// Each rank writes its own file, `rank_file(path, rank)`: a JSON object
/// `{"traceEvents": [...], "displayTimeUnit": "ms"}` with one complete event
/// per span (`pid` = rank, `tid` = lane) and metadata events naming the
/// process "rank N" and the lanes "compute" and "comm". Open it in Perfetto
/// (ui.perfetto.dev) or chrome://tracing; docs/training.md shows how to merge
/// the ranks' files into one.
/// @code
///   train::timeline tl(comm.rank(), "trace.json");   // writes trace.rank0.json, ...
///   { auto s = tl.scope("forward", step); logits = model(x); }
///   tl.write();
/// @endcode
class timeline {
 public:
  /// Disabled.
  timeline() = default;
  /// Enabled; write() goes to rank_file(path, rank).
  timeline(int rank, std::filesystem::path path);
  /// Enabled when RINGFLOW_TIMELINE names a path, disabled otherwise.
  static timeline from_env(int rank);

  bool enabled() const { return static_cast<bool>(state_); }
  /// The file write() produces (empty when disabled).
  std::filesystem::path file() const;

  /// Records a finished span; callable from any thread.
  void record(trace_event e) const;
  /// Records a span [start_us, end_us) with `name` on `lane`.
  void record(std::string_view name, train::lane l, double start_us, double end_us,
              std::int64_t step = -1) const;

  /// RAII span on the compute lane, recorded when it goes out of scope.
  class scoped_span {
   public:
    scoped_span(const timeline* owner, std::string_view name, std::int64_t step);
    ~scoped_span();
    scoped_span(const scoped_span&) = delete;
    scoped_span& operator=(const scoped_span&) = delete;

   private:
    const timeline* owner_;
    std::string name_;
    std::int64_t step_;
    double start_us_;
  };
  scoped_span scope(std::string_view name, std::int64_t step = -1) const {
    return scoped_span(this, name, step);
  }

  /// A copy of every span recorded so far, in recording order.
  std::vector<trace_event> events() const;
  /// Writes the trace file (replacing it); throws ringflow::error naming the
  /// file when it cannot be written. A no-op when disabled.
  void write() const;

 private:
  struct state;
  std::shared_ptr<state> state_;
};

/// Reads a trace written by timeline::write() (or any Chrome trace JSON
/// object with "traceEvents") and returns its complete ("X") events. Throws
/// ringflow::error naming the file and the offset when the JSON is invalid.
std::vector<trace_event> read_trace(const std::filesystem::path& file);

/// How much of the communication the trace shows hidden behind backward.
struct overlap_summary {
  double comm_us = 0;      ///< total duration of the allreduce spans (comm lane)
  double hidden_us = 0;    ///< the part of it inside a backward span of the same rank and step
  double backward_us = 0;  ///< total duration of the backward spans
  double wait_us = 0;      ///< total duration of the "wait" spans (training thread blocked)
  std::int64_t steps = 0;  ///< distinct steps with a backward span
  /// hidden_us / comm_us (0 when there was no communication).
  double hidden_fraction() const { return comm_us > 0 ? hidden_us / comm_us : 0.0; }
};

/// Overlap of communication with backward over all events (any ranks).
overlap_summary summarize_overlap(const std::vector<trace_event>& events);

}  // namespace ringflow::train
