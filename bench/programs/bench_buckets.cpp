// bench_buckets: bucketed gradient averaging against one allreduce per tensor, and a bucket-cap
// sweep on an MLP step.
//
//   mpirun -np 4 build/bin/bench_buckets                  # both parts
//   mpirun -np 4 build/bin/bench_buckets --part small --reps 21
//
// Part "small": a model of 200 tensors of 4 KiB; data_parallel::finish()
// with one bucket per tensor (cap 0) against the default buckets, in the same
// run, interleaved rep by rep; medians and the median of per-rep ratios.
// Part "sweep": a full step (forward, backward with overlapped buckets,
// finish) of the MLP 784-256-128-10 at batch 128/N for several caps,
// interleaved; median step time per cap.
#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "tool_flags.hpp"
#include <ringflow/ad/autodiff.hpp>
#include <ringflow/backends/mpi.hpp>
#include <ringflow/coll/collectives.hpp>
#include <ringflow/train/data_parallel.hpp>

namespace ad = ringflow::ad;
namespace rt = ringflow::train;

namespace {

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

// Seconds per call of `body`, timed over `iters` calls on rank 0's clock
// after a barrier, with the slowest rank's time (max) reported.
template <class Body>
double time_per_iter(const ringflow::communicator& comm, int iters, Body body) {
  ringflow::barrier(comm);
  const double t0 = now_s();
  for (int i = 0; i < iters; ++i) body();
  double dt = (now_s() - t0) / iters;
  ringflow::allreduce(comm, std::span<double>(&dt, 1), ringflow::max);
  return dt;
}

struct args {
  std::string part = "all";
  int reps = 15;
  int iters = 10;
};

// Nullopt after --help; throws tool_flags::bad_flag.
std::optional<args> parse(int argc, char** argv) {
  args a;
  ringflow::tool_flags::reader flags(argc, argv);
  while (flags.next()) {
    if (flags.is("--part")) {
      a.part = flags.value();
      if (a.part != "all" && a.part != "small" && a.part != "sweep") {
        throw ringflow::tool_flags::bad_flag(
            fmt::format("--part expects all, small or sweep, got '{}'", a.part));
      }
    } else if (flags.is("--reps")) {
      a.reps = static_cast<int>(flags.integer(1, 100000));
    } else if (flags.is("--iters")) {
      a.iters = static_cast<int>(flags.integer(1, 1000000));
    } else if (flags.is("--help", "-h")) {
      std::printf(
          "bench_buckets [--part all|small|sweep] [--reps N in [1, 100000]] "
          "[--iters N in [1, 1000000]]\n");
      return std::nullopt;
    } else {
      flags.unknown();
    }
  }
  return a;
}

void small_tensors(const ringflow::communicator& comm, const args& a) {
  const int tensors = 200;
  const ad::index floats = 1024;  // 4 KiB
  ad::parameter_store<float> per_tensor_store, bucketed_store;
  for (int i = 0; i < tensors; ++i) {
    per_tensor_store.add(fmt::format("t{}", i), {floats});
    bucketed_store.add(fmt::format("t{}", i), {floats});
  }
  rt::data_parallel per_tensor(comm, per_tensor_store,
                               {.bucket_cap_bytes = 0, .first_bucket_cap_bytes = 0});
  rt::data_parallel bucketed(comm, bucketed_store);
  std::vector<double> t_per, t_buck, ratio;
  for (int r = 0; r < a.reps; ++r) {
    // Alternate which goes first, so drift in the machine's load hits both.
    double tp = 0, tb = 0;
    if (r % 2 == 0) {
      tp = time_per_iter(comm, a.iters, [&] { per_tensor.finish(); });
      tb = time_per_iter(comm, a.iters, [&] { bucketed.finish(); });
    } else {
      tb = time_per_iter(comm, a.iters, [&] { bucketed.finish(); });
      tp = time_per_iter(comm, a.iters, [&] { per_tensor.finish(); });
    }
    t_per.push_back(tp);
    t_buck.push_back(tb);
    ratio.push_back(tp / tb);
  }
  if (comm.rank() == 0) {
    fmt::print("small tensors: {} x {} KiB, {} ranks, {} reps x {} iters (interleaved)\n", tensors,
               floats * 4 / 1024, comm.size(), a.reps, a.iters);
    fmt::print("| method | allreduces | median time/step (ms) |\n|---|---|---|\n");
    fmt::print("| one allreduce per tensor | {} | {:.3f} |\n", per_tensor.buckets().size(),
               1e3 * median(t_per));
    fmt::print("| buckets (cap {} KiB, first {} KiB) | {} | {:.3f} |\n",
               rt::default_bucket_cap_bytes / 1024, rt::default_first_bucket_cap_bytes / 1024,
               bucketed.buckets().size(), 1e3 * median(t_buck));
    fmt::print("speedup (median of per-rep ratios): {:.1f}x\n\n", median(ratio));
  }
}

void cap_sweep(const ringflow::communicator& comm, const args& a) {
  const std::vector<std::size_t> caps = {0, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 25 << 20};
  const std::size_t global = 128;
  const std::size_t local =
      std::max<std::size_t>(1, global / static_cast<std::size_t>(comm.size()));
  struct setup {
    std::unique_ptr<ad::mlp> model;
    std::unique_ptr<rt::data_parallel> dp;
  };
  std::vector<setup> setups;
  for (std::size_t cap : caps) {
    setup s;
    s.model = std::make_unique<ad::mlp>(std::vector<ad::index>{784, 256, 128, 10},
                                        ad::activation::relu, 42);
    s.dp = std::make_unique<rt::data_parallel>(
        comm, s.model->parameters(),
        rt::data_parallel_options{
            .bucket_cap_bytes = cap,
            .first_bucket_cap_bytes = std::min(cap, rt::default_first_bucket_cap_bytes)});
    setups.push_back(std::move(s));
  }
  std::vector<float> x(local * 784);
  for (std::size_t i = 0; i < x.size(); ++i)
    x[i] = static_cast<float>((i * 37 + comm.rank()) % 101) / 50.0f - 1.0f;
  std::vector<int> y(local);
  for (std::size_t i = 0; i < local; ++i) y[i] = static_cast<int>(i % 10);
  const auto step = [&](setup& s) {
    s.model->zero_grad();
    auto xt = ad::tensor::from_data(x.data(), {static_cast<ad::index>(local), 784});
    s.dp->backward(ad::softmax_cross_entropy((*s.model)(xt), std::span<const int>(y)));
    s.dp->finish();
  };
  std::vector<std::vector<double>> times(caps.size());
  for (int r = 0; r < a.reps; ++r) {
    for (std::size_t k = 0; k < caps.size(); ++k) {
      // Rotate the starting cap each rep.
      const std::size_t c = (k + static_cast<std::size_t>(r)) % caps.size();
      times[c].push_back(time_per_iter(comm, a.iters, [&] { step(setups[c]); }));
    }
  }
  // Exposed communication without any: the same step on one rank's compute only.
  if (comm.rank() == 0) {
    fmt::print(
        "bucket-cap sweep: mlp 784-256-128-10, batch {} per rank, {} ranks, {} reps x {} "
        "iters (interleaved)\n",
        local, comm.size(), a.reps, a.iters);
    fmt::print(
        "| cap | buckets | median step (ms) | vs 25 MiB (one bucket) |\n|---|---|---|---|\n");
    const double ref = median(times.back());
    for (std::size_t k = 0; k < caps.size(); ++k) {
      const double m = median(times[k]);
      fmt::print(
          "| {} | {} | {:.3f} | {:.2f} |\n",
          caps[k] == 0 ? std::string("0 (per tensor)") : fmt::format("{} KiB", caps[k] / 1024),
          setups[k].dp->buckets().size(), 1e3 * m, m / ref);
    }
    fmt::print("\n");
  }
}

}  // namespace

int main(int argc, char** argv) {
  ringflow::mpi::environment env(argc, argv);
  auto comm = ringflow::mpi::world();
  std::optional<args> parsed;
  try {
    parsed = parse(argc, argv);
  } catch (const ringflow::tool_flags::bad_flag& e) {
    return comm.rank() == 0 ? ringflow::tool_flags::report("bench_buckets", e)
                            : ringflow::tool_flags::bad_flag_status;
  }
  if (!parsed) return 0;
  const args& a = *parsed;
  if (a.part == "all" || a.part == "small") small_tensors(comm, a);
  if (a.part == "all" || a.part == "sweep") cap_sweep(comm, a);
  return 0;
}
