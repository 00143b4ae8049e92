// ringflow-bench command line: the flags (nccl-tests names plus ringflow's own) and their parser.
#pragma once

#include <cstddef>
#include <stdexcept>
#include <string>
#include <vector>

#include "harness.hpp"
#include "tool_flags.hpp"

namespace ringflow::bench {

/// A bad command line; the message names the flag. Exit status 2.
using ringflow::tool_flags::bad_flag;

/// The largest message -b / -e accept (8 GiB: a run needs a few times it
/// per rank).
inline constexpr std::size_t max_message_bytes = std::size_t{8} << 30;

struct bench_cli {
  std::size_t min_bytes = 1024;
  std::size_t max_bytes = std::size_t{64} << 20;
  std::size_t factor = 4;
  int iters = 20;
  int warmup = 5;
  int reps = 5;
  bool check = true;
  bool extended = false;
  bool help = false;
  bool calibrate = false;  // --calibrate: measure and save the cost model (bench/calibrate.cpp)
  bool tune = false;       // --tune: measure and save a tuning table (bench/algo_sweep.cpp)
  bool gloo = true;        // --no-gloo: leave Gloo's peers out of --algo all
  std::string coll = "allreduce";
  std::string algo;      // empty: the collective's default
  std::string baseline;  // "" or "mpi"
  std::string csv_path;  // "" none, "-" stdout
  std::string json_path;
  std::string ring_order = "identity";  // --ring-order (bench/ring_order.cpp)
  bench_config cfg;
};

/// Parses argv (without touching MPI); throws bad_flag naming the flag.
bench_cli parse_cli(int argc, char** argv);

/// Checks what needs the table or the rank count (collective, algorithm,
/// dtype support, root); throws bad_flag. Fills cli.cfg.algorithm.
const collective_entry& resolve(bench_cli& cli, int nranks);

/// The message sizes to run, in bytes.
std::vector<std::size_t> message_sizes(const bench_cli& cli);

/// The --help text.
std::string usage_text();

}  // namespace ringflow::bench
