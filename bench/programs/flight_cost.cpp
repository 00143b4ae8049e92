// flight_cost: what the flight recorder adds to one collective, timed
// directly: begin a record, note one blocked wait, end it, as
// begin_collective / a transport wait / collective_scope do.
//
//   build/bin/flight_cost [--iters N] [--reps R]
//
// Prints the median over R repetitions of the ns per collective; divide by a
// collective's time (ringflow-bench) for the relative cost.
#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <string_view>
#include <vector>

#include <ringflow/comm/flight.hpp>

int main(int argc, char** argv) {
  long long iters = 5'000'000;
  long long reps = 9;
  for (int i = 1; i < argc; ++i) {
    const std::string_view a(argv[i]);
    if ((a == "--iters" || a == "--reps") && i + 1 < argc) {
      char* end = nullptr;
      const long long v = std::strtoll(argv[++i], &end, 10);
      if (*end != '\0' || v < 1 || v > 1'000'000'000) {
        fmt::print(stderr, "flight_cost: {} '{}' must be a count in [1, 1e9]\n", a, argv[i]);
        return 2;
      }
      (a == "--iters" ? iters : reps) = v;
    } else {
      fmt::print(stderr, "flight_cost: unknown flag '{}' (use --iters N, --reps R)\n", a);
      return 2;
    }
  }
  ringflow::detail::flight_ring ring(ringflow::flight::ring_size(), 1, 0, 2, "bench");
  std::vector<double> ns;
  for (long long r = 0; r < reps; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    for (long long i = 0; i < iters; ++i) {
      auto* rec =
          ring.begin(static_cast<std::uint64_t>(r * iters + i), ringflow::coll_kind::allreduce,
                     ringflow::dtype::f32, ringflow::op_kind::sum, 256, -1);
      rec->algorithm.store("ring", std::memory_order_relaxed);
      rec->note_wait(1, 16385);
      ringflow::detail::flight_ring::end(rec, true);
    }
    const auto t1 = std::chrono::steady_clock::now();
    ns.push_back(std::chrono::duration<double, std::nano>(t1 - t0).count() /
                 static_cast<double>(iters));
  }
  std::sort(ns.begin(), ns.end());
  fmt::print(
      "flight recorder: {:.1f} ns per collective (begin + one blocked wait + end; median "
      "of {} x {} ; min {:.1f}, max {:.1f})\n",
      ns[ns.size() / 2], reps, iters, ns.front(), ns.back());
  return 0;
}
