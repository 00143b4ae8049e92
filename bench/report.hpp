// ringflow-bench output: the nccl-tests style table, CSV rows and the JSON document.
#pragma once

#include <cstddef>
#include <cstdio>
#include <string>
#include <vector>

#include "harness.hpp"

namespace ringflow::bench {

/// Per-repetition times of one side at one size (each the mean over -n
/// iterations on the slowest rank), in microseconds.
struct rep_times {
  std::vector<double> reps_us;
  double median_us = 0, min_us = 0, max_us = 0;
  double p99_us = 0;  // interpolated 99th percentile (the max when reps < 100)
  /// Sorts a copy and fills median/min/max/p99.
  void summarize();
};

struct side_result {
  rep_times time;
  double algbw = 0, busbw = 0;  // GB/s (1e9 bytes per second), from the median time
  std::size_t wrong = 0;        // summed over ranks
};

struct size_result {
  bench_shape shape;
  side_result ringflow;
  bool has_baseline = false;
  side_result baseline;
  double ratio = 0;         // ringflow busbw / baseline busbw (of the median times)
  double paired_ratio = 0;  // median over reps k of baseline time k / ringflow time k
};

/// What the header lines and the CSV/JSON metadata say about the run.
struct run_info {
  std::string coll, algo, type, op, baseline_call;
  int ranks = 0, hosts = 0, root = 0;
  std::string host, cpu_model, mpi_library, backend;
  unsigned nproc = 0;   // CPUs of the machine
  int usable_cpus = 0;  // CPUs rank 0 may run on (sched_getaffinity: taskset, cgroups)
  int iters = 0, warmup = 0, reps = 0;
  std::size_t segment_bytes = 0;
  bool segment_default = true;
  bool check = true, extended = false, checked_mode = false;
  std::string bus_factor_text;
};

/// The human-readable table on a stream (rank 0's stdout).
class table_printer {
 public:
  table_printer(std::FILE* out, const run_info& info) : out_(out), info_(info) {}
  void header() const;
  void skipped(std::size_t bytes) const;
  void row(const size_result& r) const;
  void footer(const std::vector<size_result>& rows) const;

 private:
  std::FILE* out_;
  const run_info& info_;
};

/// CSV: bytes,algo,ranks,time_us,algbw_GBs,busbw_GBs,wrong[,baseline_busbw_GBs,ratio],...
void write_csv(std::FILE* out, const run_info& info, const std::vector<size_result>& rows);
/// JSON: {"run": {...}, "results": [...]} with every repetition's time.
void write_json(std::FILE* out, const run_info& info, const std::vector<size_result>& rows);

}  // namespace ringflow::bench
