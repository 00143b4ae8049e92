// Schedule verifier: checks that every send meets its receive and that the
// schedule cannot deadlock, and predicts its timeline, bubble and memory;
// plus the pictures of a predicted timeline (ASCII grid, SVG).
#pragma once

#include <cstddef>
#include <string>
#include <vector>

#include "ringflow/pipeline/schedule.hpp"

namespace ringflow::pipeline {

/// Per-stage compute times for the prediction (any unit; microseconds in
/// the benchmarks).
struct stage_costs {
  std::vector<double> forward;   ///< per stage
  std::vector<double> backward;  ///< per stage, input + weight gradients
  /// Share of `backward` spent in backward_weight when a schedule splits it.
  double weight_fraction = 0.5;
  /// Added between a send and the matching receive's completion.
  double transfer = 0.0;

  /// Every stage forward f, backward b.
  static stage_costs uniform(int stages, double f, double b);
};

/// One compute instruction placed in (predicted or measured) time.
struct timed_op {
  int rank = 0;
  std::size_t step = 0;  ///< index in the rank's program
  instruction ins;
  double start = 0.0;
  double end = 0.0;
};

/// What verify() found for a schedule that is correct.
struct verify_report {
  /// Per rank: most micro-batch activations held at once (forward done,
  /// backward not finished), counted over all the rank's stages.
  std::vector<int> peak_activations;
  /// Per rank: total compute time.
  std::vector<double> busy;
  /// Time from the first instruction to the last (all ranks start at 0).
  double makespan = 0.0;
  /// 1 - sum(busy) / (ranks * makespan): the idle share of the machine.
  double bubble_fraction = 0.0;
  /// Every compute instruction with its predicted start and end.
  std::vector<timed_op> timeline;
};

/// Simulates `s` with blocking receives and buffered sends and checks it:
///  - every instruction names a stage of its own rank and a valid micro-batch;
///  - every stage runs forward and backward once per micro-batch, in order,
///    with the inputs it needs received before use;
///  - every send has exactly one matching receive on the neighbouring stage's
///    rank and vice versa;
///  - the ranks cannot deadlock. Otherwise it throws usage_error with the
///    first stuck state as a rank x step grid, the blocked instructions
///    marked [like this], and what each one waits for.
/// Costs default to forward 1 and backward 2 for every stage.
verify_report verify(const schedule& s, const stage_costs& costs = {});

/// (p - 1) / (m + p - 1): the bubble fraction of GPipe and 1F1B with equal
/// stage times and free transfers.
double textbook_bubble(int ranks, int micro_batches);

/// The predicted timeline as text: one row per rank, one column per time
/// unit (the shortest compute op), each cell the op and micro-batch running
/// then ("F3", "B3", "b3" for BI, "W3" for BW; ".c" appended for chunk c of
/// an interleaved schedule), '.' when idle.
std::string ascii_grid(const schedule& s, const verify_report& r);
/// Same, from verify(s, costs).
std::string ascii_grid(const schedule& s, const stage_costs& costs = {});

/// An SVG picture of the timeline (no external dependencies): one lane per
/// rank, forward blue, backward green, weight-gradient orange, chunks in
/// different shades, micro-batch numbers inside, bubble fraction in the title.
std::string to_svg(const schedule& s, const verify_report& r, const std::string& title = {});

}  // namespace ringflow::pipeline
