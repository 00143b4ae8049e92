// gpu-staged-bench: the staged MPI path (cuda::staged_allreduce) against what
// a user without it would write, so that its claim (double-buffered: the
// copies of some segments overlap the transfers of others) is a number.
// Run under mpirun; ranks share GPU 0 when there is only one.
//
//   mpirun -np 2 gpu-staged-bench [-b 1M] [-e 64M] [-f 4] [--reps 7] [--iters 3] [--warmup 1]
//
// Float sum, out of place, bytes per rank from -b to -e (times -f). Each
// repetition runs, in this order, `iters` calls of:
//   staged     cuda::staged_allreduce of a device buffer, default staged_options
//   naive-mpi  cudaMemcpy D2H into pinned memory, MPI_Allreduce (algo::native),
//              cudaMemcpy H2D: all serialized, no overlap
//   naive-ring the same with ringflow's host ring instead of MPI_Allreduce
//   host-ring  ringflow's host ring of the pinned host buffers alone: no copies
//              (the floor the staged path would reach if its copies were free)
// The two rings use the staged path's segment (1 MiB), so staged and
// naive-ring run the same schedule and must agree bit for bit (#wrong, checked
// once per size). Time of a call: MPI_Barrier, wall clock around the call,
// max over ranks; per repetition the mean over `iters` calls; medians over
// repetitions reported. algbw = bytes per rank / time. a/b and a/d are
// time ratios (staged over naive-mpi, staged over host-ring): below 1 the
// staged path is faster. Rank 0 prints. Exits 77 without a GPU.
#include <cuda_runtime_api.h>
#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "count_arg.hpp"
#include "ringflow/backends/mpi.hpp"
#include "ringflow/coll/collectives.hpp"
#include "ringflow/coll/options.hpp"
#include "ringflow/cuda/check.hpp"
#include "ringflow/cuda/device.hpp"
#include "ringflow/cuda/ring.hpp"
#include "ringflow/cuda/runtime.hpp"

namespace {

namespace rc = ringflow::cuda;

struct options {
  std::size_t min_bytes = std::size_t{1} << 20;
  std::size_t max_bytes = std::size_t{64} << 20;
  std::size_t factor = 4;
  int reps = 7;
  int iters = 3;
  int warmup = 1;
};

constexpr std::string_view usage_line =
    "usage: gpu-staged-bench [-b 1M] [-e 64M] [-f 4] [--reps 7] [--iters 3] [--warmup 1]\n";

[[noreturn]] void usage(const std::string& msg, bool print) {
  if (print) fmt::print(stderr, "gpu-staged-bench: {}\n{}", msg, usage_line);
  std::exit(2);
}

std::size_t parse_count(std::string_view s, bool print) {
  const auto v = ringflow::bench_gpu::parse_count(s);
  if (!v) usage("not a positive count: " + std::string(s), print);
  return *v;
}

// Every rank parses; only rank 0 prints what is wrong (all exit 2 alike).
options parse(int argc, char** argv, bool print) {
  options o;
  for (int i = 1; i < argc; ++i) {
    const std::string_view arg = argv[i];
    auto value = [&]() -> std::string_view {
      if (i + 1 >= argc) usage(std::string(arg) + " needs a value", print);
      return argv[++i];
    };
    if (arg == "-b" || arg == "--minbytes") {
      o.min_bytes = parse_count(value(), print);
    } else if (arg == "-e" || arg == "--maxbytes") {
      o.max_bytes = parse_count(value(), print);
    } else if (arg == "-f" || arg == "--stepfactor") {
      o.factor = parse_count(value(), print);
    } else if (arg == "--reps") {
      o.reps = static_cast<int>(parse_count(value(), print));
    } else if (arg == "--iters") {
      o.iters = static_cast<int>(parse_count(value(), print));
    } else if (arg == "--warmup") {
      o.warmup = std::atoi(std::string(value()).c_str());
    } else if (arg == "-h" || arg == "--help") {
      if (print) fmt::print("{}", usage_line);
      std::exit(0);
    } else {
      usage("unknown argument " + std::string(arg), print);
    }
  }
  if (o.min_bytes < sizeof(float)) usage("-b must be at least 4 bytes", print);
  if (o.min_bytes > o.max_bytes) usage("-b is larger than -e", print);
  if (o.factor < 2) usage("-f must be at least 2", print);
  if (o.warmup < 0) usage("--warmup must be >= 0", print);
  return o;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const std::size_t m = v.size() / 2;
  return v.size() % 2 == 1 ? v[m] : 0.5 * (v[m - 1] + v[m]);
}

// Values in [-1, 1) that differ per rank and element, so the sums round and a
// different summation order would show in the bits.
std::vector<float> rank_values(std::size_t n, int rank) {
  std::vector<float> v(n);
  std::uint64_t x = 0x9E3779B97F4A7C15ull * static_cast<std::uint64_t>(rank + 1);
  for (auto& e : v) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    e = static_cast<float>(static_cast<double>(x >> 40) / static_cast<double>(1ull << 23) - 1.0);
  }
  return v;
}

std::string size_text(std::size_t bytes) {
  if (bytes >= (std::size_t{1} << 30) && bytes % (std::size_t{1} << 30) == 0)
    return fmt::format("{}G", bytes >> 30);
  if (bytes >= (std::size_t{1} << 20) && bytes % (std::size_t{1} << 20) == 0)
    return fmt::format("{}M", bytes >> 20);
  if (bytes >= (std::size_t{1} << 10) && bytes % (std::size_t{1} << 10) == 0)
    return fmt::format("{}K", bytes >> 10);
  return fmt::format("{}", bytes);
}

int run(const ringflow::communicator& world, const options& o) {
  const bool root = world.rank() == 0;
  // The host rings run the staged path's segment, so that staged and
  // naive-ring are the same schedule (bit-identical results).
  const ringflow::coll_options ring{ringflow::algo::ring, rc::default_staged_segment_bytes};
  const ringflow::coll_options native{ringflow::algo::native, 0};
  constexpr int variants = 4;
  constexpr std::array<std::string_view, variants> names{"staged", "naive-mpi", "naive-ring",
                                                         "host-ring"};

  if (root) {
    fmt::print("# gpu-staged-bench: {} ranks on {} (GPU 0 of {}), float sum, out of place\n",
               world.size(), rc::device_name(0), rc::device_count());
    fmt::print(
        "# reps {} x iters {} (warmup {}), medians; time = max over ranks, barrier before "
        "each call; ring segment {} B\n",
        o.reps, o.iters, o.warmup, rc::default_staged_segment_bytes);
    fmt::print(
        "# a = staged, b = naive-mpi (D2H, MPI_Allreduce, H2D), c = naive-ring (D2H, "
        "ring, H2D), d = host-ring (no copies); a/b, a/d = time ratios (< 1: staged "
        "faster)\n");
    fmt::print("#\n# {:>8} {:>10} ", "size", "count");
    for (auto n : names) fmt::print(" {:>19}", n);
    fmt::print("  {:>6} {:>6} {:>7}\n", "a/b", "a/d", "#wrong");
    fmt::print("# {:>8} {:>10} ", "(B/rank)", "(elems)");
    for (int v = 0; v < variants; ++v) fmt::print(" {:>9} {:>9}", "time(ms)", "algbw");
    fmt::print("  {:>6} {:>6} {:>7}\n", "", "", "");
  }

  for (std::size_t bytes = o.min_bytes; bytes <= o.max_bytes; bytes *= o.factor) {
    const std::size_t n = bytes / sizeof(float);
    const std::size_t nbytes = n * sizeof(float);
    const std::vector<float> init = rank_values(n, world.rank());
    rc::device_buffer<float> d_in(n), d_out(n);
    rc::pinned_buffer<float> h_in(n), h_out(n);
    RINGFLOW_CHECK_CUDA(cudaMemcpy(d_in.data(), init.data(), nbytes, cudaMemcpyHostToDevice));
    std::memcpy(h_in.data(), init.data(), nbytes);

    const std::span<const float> din(d_in.data(), n);
    const std::span<float> dout(d_out.data(), n);
    const std::span<const float> hin(h_in.data(), n);
    const std::span<float> hout(h_out.data(), n);

    // What a user without the staged path writes: every step waits for the
    // one before (cudaMemcpy with pinned memory returns when the copy is done).
    auto naive = [&](const ringflow::coll_options& how) {
      RINGFLOW_CHECK_CUDA(cudaMemcpy(h_in.data(), d_in.data(), nbytes, cudaMemcpyDeviceToHost));
      ringflow::allreduce(world, hin, hout, ringflow::sum, how);
      RINGFLOW_CHECK_CUDA(cudaMemcpy(d_out.data(), h_out.data(), nbytes, cudaMemcpyHostToDevice));
    };
    const std::array<std::function<void()>, variants> calls{
        [&] { rc::staged_allreduce(world, din, dout, ringflow::sum); },
        [&] { naive(native); },
        [&] { naive(ring); },
        [&] { ringflow::allreduce(world, hin, hout, ringflow::sum, ring); },
    };

    // Once per size: staged against naive-ring, bit for bit.
    std::vector<float> got(n), want(n);
    calls[0]();
    RINGFLOW_CHECK_CUDA(cudaMemcpy(got.data(), d_out.data(), nbytes, cudaMemcpyDeviceToHost));
    RINGFLOW_CHECK_CUDA(cudaMemset(d_out.data(), 0, nbytes));
    calls[2]();
    RINGFLOW_CHECK_CUDA(cudaMemcpy(want.data(), d_out.data(), nbytes, cudaMemcpyDeviceToHost));
    std::int64_t wrong = 0;
    for (std::size_t i = 0; i < n; ++i) {
      wrong += std::memcmp(&got[i], &want[i], sizeof(float)) != 0 ? 1 : 0;
    }
    ringflow::allreduce(world, std::span<std::int64_t>(&wrong, 1), ringflow::sum);

    for (int w = 0; w < o.warmup; ++w) {
      for (const auto& call : calls) call();
    }
    std::array<std::vector<double>, variants> ms;
    for (int r = 0; r < o.reps; ++r) {
      for (int v = 0; v < variants; ++v) {
        double total = 0.0;
        for (int it = 0; it < o.iters; ++it) {
          ringflow::barrier(world);
          const auto t0 = std::chrono::steady_clock::now();
          calls[static_cast<std::size_t>(v)]();
          double t =
              std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0)
                  .count();
          ringflow::allreduce(world, std::span<double>(&t, 1), ringflow::max);
          total += t;
        }
        ms[static_cast<std::size_t>(v)].push_back(total / o.iters);
      }
    }

    if (root) {
      std::array<double, variants> med{};
      fmt::print("  {:>8} {:>10} ", size_text(nbytes), n);
      for (std::size_t v = 0; v < variants; ++v) {
        med[v] = median(ms[v]);
        fmt::print(" {:>9.3f} {:>9.2f}", med[v], static_cast<double>(nbytes) / med[v] / 1e6);
      }
      fmt::print("  {:>6.2f} {:>6.2f} {:>7}\n", med[0] / med[1], med[0] / med[3], wrong);
      std::fflush(stdout);
    }
    if (wrong != 0) {
      if (root)
        fmt::print(stderr, "gpu-staged-bench: staged and naive-ring differ at {} B\n", nbytes);
      return 1;
    }
    if (bytes > o.max_bytes / o.factor) break;  // the next step would overflow or pass -e
  }
  if (root) fmt::print("# algbw in GB/s (1e9 B/s) of the bytes per rank\n");
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  ringflow::mpi::environment env(argc, argv);
  auto world = ringflow::mpi::world();
  const options o = parse(argc, argv, world.rank() == 0);
  // Every rank decides the same way (a rank without a GPU would otherwise
  // leave its peers waiting in the first collective).
  int have_gpu = rc::available() ? 1 : 0;
  ringflow::allreduce(world, std::span<int>(&have_gpu, 1), ringflow::min);
  if (have_gpu == 0) {
    if (world.rank() == 0) {
      fmt::print(
          "gpu-staged-bench: no GPU visible on some rank (compiled_with_cuda={}): nothing "
          "to measure\n",
          rc::compiled_with_cuda());
    }
    return 77;
  }
  // An exception (a CUDA or MPI error) escapes main: the environment then
  // aborts the whole job, so no rank waits for one that is gone.
  return run(world, o);
}
