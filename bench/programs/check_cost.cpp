// check_cost: what the default consistency check (check_mode::stamp) adds to
// one collective on the paths that carry no stamp in their messages (shm, and
// the bookkeeping every path does), timed directly: begin_collective with
// the check on against off, on a one-rank thread communicator.
//
//   build/bin/check_cost [--iters N] [--reps R]
//
// Prints the median ns per begin_collective for each mode and the difference;
// divide the difference by a collective's time (ringflow-bench) for the
// relative cost. The stamped messages' own cost (MPI ring, tree...) is in
// bench/env_cost.sh RINGFLOW_CHECK=0 (docs/results/2026-12-02-stamp-check-cost.md).
#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <string_view>
#include <vector>

#include "tool_flags.hpp"
#include <ringflow/ringflow.hpp>

namespace rf = ringflow;

int main(int argc, char** argv) {
  long long iters = 2'000'000, reps = 9;
  try {
    rf::tool_flags::reader flags(argc, argv);
    while (flags.next()) {
      if (flags.is("--iters"))
        iters = flags.integer(1, 1'000'000'000);
      else if (flags.is("--reps"))
        reps = flags.integer(1, 1000);
      else if (flags.is("--help", "-h")) {
        fmt::print("check_cost [--iters N] [--reps R]: ns per begin_collective, check on vs off\n");
        return 0;
      } else {
        flags.unknown();
      }
    }
  } catch (const rf::tool_flags::bad_flag& e) {
    return rf::tool_flags::report("check_cost", e);
  }
  double ns[2] = {0, 0};
  rf::local::run(1, [&](rf::communicator& comm) {
    const rf::check_mode modes[2] = {rf::check_mode::off, rf::check_mode::stamp};
    for (int m = 0; m < 2; ++m) {
      comm.set_check_mode(modes[m]);
      std::vector<double> runs;
      for (long long r = 0; r < reps; ++r) {
        const auto t0 = std::chrono::steady_clock::now();
        for (long long i = 0; i < iters; ++i) {
          rf::detail::begin_collective(comm, rf::coll_kind::allreduce, rf::dtype::f32,
                                       rf::op_kind::sum, 256);
        }
        runs.push_back(
            std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - t0)
                .count() /
            static_cast<double>(iters));
      }
      std::sort(runs.begin(), runs.end());
      ns[m] = runs[runs.size() / 2];
    }
  });
  fmt::print(
      "begin_collective: check off {:.1f} ns, stamp (default) {:.1f} ns: the check adds "
      "{:.1f} ns per collective (median of {} x {})\n",
      ns[0], ns[1], ns[1] - ns[0], reps, iters);
  return 0;
}
