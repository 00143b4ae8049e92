// ringflow-bench command line parsing and validation (no MPI calls: every rank parses the same
// argv).
#include "cli.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cctype>
#include <charconv>
#include <limits>
#include <string_view>

#include "ring_order.hpp"
#include "ringflow/core/error.hpp"

namespace ringflow::bench {
namespace {

constexpr dtype all_dtypes[] = {dtype::f32, dtype::f64, dtype::f16, dtype::bf16,
                                dtype::i32, dtype::i64, dtype::i8,  dtype::u8};
constexpr op_kind all_ops[] = {op_kind::sum, op_kind::prod, op_kind::min, op_kind::max,
                               op_kind::avg};

using ringflow::tool_flags::parse_bytes;
using ringflow::tool_flags::parse_int;

dtype parse_dtype(const std::string& flag, const std::string& text) {
  for (dtype t : all_dtypes) {
    if (text == dtype_name(t)) return t;
  }
  // nccl-tests spellings
  if (text == "float32" || text == "fp32") return dtype::f32;
  if (text == "float64" || text == "fp64") return dtype::f64;
  if (text == "float16" || text == "fp16") return dtype::f16;
  if (text == "bf16") return dtype::bf16;
  if (text == "int") return dtype::i32;
  throw bad_flag(fmt::format(
      "{} '{}' is not a dtype: use float, double, half, bfloat16, int32, int64, int8 or uint8",
      flag, text));
}

op_kind parse_op(const std::string& flag, const std::string& text) {
  for (op_kind k : all_ops) {
    if (text == op_name(k)) return k;
  }
  throw bad_flag(
      fmt::format("{} '{}' is not a reduce op: use sum, prod, min, max or avg", flag, text));
}

}  // namespace

bench_cli parse_cli(int argc, char** argv) {
  bench_cli cli;
  tool_flags::reader flags(argc, argv);
  while (flags.next()) {
    const std::string& arg = flags.flag();
    auto take = [&] { return flags.value(); };
    auto no_value = [&] { flags.no_value(); };

    if (arg == "-h" || arg == "--help") {
      no_value();
      cli.help = true;
    } else if (arg == "-b" || arg == "--minbytes") {
      cli.min_bytes = parse_bytes(arg, take(), 1, max_message_bytes);
    } else if (arg == "-e" || arg == "--maxbytes") {
      cli.max_bytes = parse_bytes(arg, take(), 1, max_message_bytes);
    } else if (arg == "-f" || arg == "--stepfactor") {
      cli.factor = static_cast<std::size_t>(parse_int(arg, take(), 2, 1 << 20));
    } else if (arg == "-n" || arg == "--iters") {
      cli.iters = static_cast<int>(parse_int(arg, take(), 1, 1000000));
    } else if (arg == "-w" || arg == "--warmup_iters") {
      cli.warmup = static_cast<int>(parse_int(arg, take(), 0, 1000000));
    } else if (arg == "-c" || arg == "--check") {
      cli.check = parse_int(arg, take(), 0, 1) == 1;
    } else if (arg == "-d" || arg == "--datatype") {
      cli.cfg.type = parse_dtype(arg, take());
    } else if (arg == "-o" || arg == "--op") {
      cli.cfg.op = parse_op(arg, take());
    } else if (arg == "-r" || arg == "--root") {
      cli.cfg.root = static_cast<int>(parse_int(arg, take(), 0, 1 << 30));
    } else if (arg == "--algo") {
      cli.algo = take();
    } else if (arg == "--coll") {
      cli.coll = take();
    } else if (arg == "--csv") {
      cli.csv_path = take();
      if (cli.csv_path.empty()) throw bad_flag("--csv needs a path (or - for stdout)");
    } else if (arg == "--json") {
      cli.json_path = take();
      if (cli.json_path.empty()) throw bad_flag("--json needs a path (or - for stdout)");
    } else if (arg == "--ring-order") {
      cli.ring_order = take();
      check_ring_order(cli.ring_order);
    } else if (arg == "--baseline") {
      cli.baseline = take();
      if (cli.baseline != "mpi") {
        throw bad_flag(fmt::format("--baseline '{}': the only baseline is 'mpi'", cli.baseline));
      }
    } else if (arg == "--reps") {
      cli.reps = static_cast<int>(parse_int(arg, take(), 1, 100000));
    } else if (arg == "--segment") {
      cli.cfg.segment_bytes = parse_bytes(arg, take(), 1, std::size_t{1} << 30);
    } else if (arg == "--calibrate") {
      no_value();
      cli.calibrate = true;
    } else if (arg == "--tune") {
      no_value();
      cli.tune = true;
    } else if (arg == "--no-gloo") {
      no_value();
      cli.gloo = false;
    } else if (arg == "-x" || arg == "--extended") {
      no_value();
      cli.extended = true;
    } else {
      flags.unknown();
    }
  }
  if (cli.min_bytes == 0) throw bad_flag("-b must be at least 1 byte");
  if (cli.min_bytes > cli.max_bytes) {
    throw bad_flag(fmt::format("-b {} is larger than -e {}", cli.min_bytes, cli.max_bytes));
  }
  if (cli.tune && cli.calibrate) throw bad_flag("--tune and --calibrate are separate runs");
  if (cli.tune && !cli.algo.empty() && cli.algo != "all") {
    throw bad_flag("--tune times every algorithm automatic may pick; drop --algo");
  }
  if (cli.tune) cli.algo = "all";
  if (cli.csv_path == "-" && cli.json_path == "-") {
    throw bad_flag("--csv - and --json - both want stdout; give one of them a file");
  }
  return cli;
}

const collective_entry& resolve(bench_cli& cli, int nranks) {
  // Without --algo the default is ring wherever a collective has one:
  // entries register in static-initialization order, which C++ leaves open.
  if (cli.algo.empty()) {
    for (const auto& e : collectives()) {
      const bool has_ring = std::find(e.algos.begin(), e.algos.end(), "ring") != e.algos.end();
      if (e.name == cli.coll && has_ring) cli.algo = "ring";
    }
  }
  const collective_entry* match = nullptr;
  std::vector<std::string> names, algos;
  for (const auto& e : collectives()) {
    if (std::find(names.begin(), names.end(), e.name) == names.end()) names.emplace_back(e.name);
    if (e.name != cli.coll) continue;
    algos.insert(algos.end(), e.algos.begin(), e.algos.end());
    const bool accepts =
        cli.algo.empty() || std::find(e.algos.begin(), e.algos.end(), cli.algo) != e.algos.end();
    if (accepts && match == nullptr) match = &e;
  }
  if (algos.empty()) {
    throw bad_flag(
        fmt::format("--coll '{}' is not a collective: use {}", cli.coll, fmt::join(names, ", ")));
  }
  if (match == nullptr) {
    throw bad_flag(fmt::format("--algo '{}' is not available for {}: use {}", cli.algo, cli.coll,
                               fmt::join(algos, ", ")));
  }
  if (cli.algo.empty()) cli.algo = match->algos.front();
  const collective_entry& e = *match;
  cli.cfg.algo_name = cli.algo;
  try {
    cli.cfg.algorithm = parse_algo(cli.algo);
  } catch (const ringflow::usage_error&) {
    cli.cfg.algorithm = algo::automatic;  // a bench-only algorithm: its entry decides
  }
  if (cli.cfg.algorithm == algo::native && mpi_datatype(cli.cfg.type) == MPI_DATATYPE_NULL) {
    throw bad_flag(
        fmt::format("--algo native: MPI has no {} type; use -d float, double, int8, "
                    "uint8, int32 or int64, or --algo ring",
                    dtype_name(cli.cfg.type)));
  }
  if (!cli.baseline.empty()) {
    if (e.run_baseline == nullptr) {
      throw bad_flag(fmt::format("--baseline mpi: {} has no MPI baseline", e.name));
    }
    if (mpi_datatype(cli.cfg.type) == MPI_DATATYPE_NULL) {
      throw bad_flag(
          fmt::format("--baseline mpi: MPI has no {} type; use -d float, double, int8, "
                      "uint8, int32 or int64",
                      dtype_name(cli.cfg.type)));
    }
    // MPI counts are int.
    const bench_shape s = e.shape(cli.max_bytes, dtype_size(cli.cfg.type), nranks, 0);
    if (s.total > static_cast<std::size_t>(std::numeric_limits<int>::max())) {
      throw bad_flag(
          fmt::format("--baseline mpi: -e {} needs {} elements, more than MPI's int "
                      "count allows",
                      cli.max_bytes, s.total));
    }
  }
  if (cli.cfg.root >= nranks) {
    throw bad_flag(fmt::format("-r {} is not a rank (there are {} ranks)", cli.cfg.root, nranks));
  }
  return e;
}

std::vector<std::size_t> message_sizes(const bench_cli& cli) {
  std::vector<std::size_t> sizes;
  for (std::size_t b = cli.min_bytes; b <= cli.max_bytes;) {
    sizes.push_back(b);
    if (b > std::numeric_limits<std::size_t>::max() / cli.factor) break;
    b *= cli.factor;
  }
  return sizes;
}

std::string usage_text() {
  return R"(usage: mpirun -np N ringflow-bench [flags]

Times one ringflow collective over a range of message sizes, nccl-tests style.

  -b, --minbytes BYTES     smallest message (K/M/G suffixes; 1 to 8G; default 1K)
  -e, --maxbytes BYTES     largest message (1 to 8G; default 64M)
  -f, --stepfactor F       multiply the size by F each step (2 to 2^20; default 4)
  -n, --iters N            timed iterations per repetition (1 to 10^6; default 20)
  -w, --warmup_iters N     untimed iterations before timing (0 to 10^6; default 5)
      --reps R             repetitions; times are the median over them (1 to 10^5; default 5)
  -c, --check 0|1          check the result of a fresh run after timing (default 1)
  -d, --datatype TYPE      float double half bfloat16 int32 int64 int8 uint8 (default float)
  -o, --op OP              sum prod min max avg (default sum)
  -r, --root RANK          root of broadcast, gather, scatter, reduce (default 0)
      --coll NAME          allreduce reduce_scatter allgather broadcast alltoall alltoallv
                           gather scatter reduce allgatherv (default allreduce)
      --algo NAME          ring | native | auto (native: MPI_Allreduce, allreduce only);
                           allreduce also: recursive_doubling halving_doubling tree
                           double_tree hierarchical shm, and all (every algorithm,
                           auto and MPI_Allreduce interleaved at each size, and
                           Gloo's ring, ring_chunked, halving_doubling when built with it);
                           reduce_scatter and allgather also: halving_doubling
                           (recursive halving / doubling on power-of-two ranks);
                           alltoall: auto pairwise bruck; reduce: auto tree ring
      --calibrate          measure alpha, beta, gamma here and save the cost model to
                           $RINGFLOW_COST_MODEL or ~/.cache/ringflow/cost_model.json
      --no-gloo            leave Gloo's peers out of --algo all (they take milliseconds
                           per call here, which makes long sweeps longer)
      --tune               time every algorithm auto may pick (shm too when usable) at each
                           size, interleaved, and save the medians as this rank count's and
                           node layout's tuning table in $RINGFLOW_TUNING, else
                           ~/.cache/ringflow/tuning-<host>.json (auto then picks from it;
                           use --reps 9 or more; RINGFLOW_TUNING=off ignores tables)
      --segment BYTES      ring pipeline segment (1 to 1G; default: the library's, 256K)
      --baseline mpi       interleave the matching MPI collective rep by rep with
                           ringflow and print its busbw and ratio = ringflow/mpi
      --csv PATH           write one CSV row per size (- for stdout, replaces the table)
      --json PATH          write the run as JSON (- for stdout, replaces the table)
      --ring-order ORDER   identity | reverse | random:SEED: permute the ranks (a split
                           communicator) so the ring visits them in another order
  -x, --extended           also print min and max over the repetitions
  -h, --help               this text

time  = median over --reps of (mean time of -n iterations, slowest rank)
algbw = size / time;  busbw = algbw * factor: allreduce 2(n-1)/n,
        reduce_scatter and allgather (n-1)/n, broadcast 1 (see docs/benchmarks.md)
Exit status: 0 ok, 1 wrong results or a failure, 2 bad flags (one line on stderr
naming the flag and the range it accepts).
)";
}

}  // namespace ringflow::bench
