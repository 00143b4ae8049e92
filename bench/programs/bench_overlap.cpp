// bench_overlap: how much bucket communication hides behind backward, read back from the per-rank
// timeline files.
//
//   mpirun -np 4 build/bin/bench_overlap                       # MLP 784-1024-1024-1024-10
//   mpirun -np 4 build/bin/bench_overlap --steps 30 --out /tmp/ov
//   build/bin/bench_overlap --analyze trace.json --ranks 4     # traces of another run
//
// Runs `steps` training steps twice, with the default bucket cap and with one
// bucket (nothing can overlap), each with a timeline; then rank 0 parses the
// ranks' trace files and prints the share of allreduce time that fell inside
// backward, plus the time the training thread still waited.
#include <fmt/format.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

#include "tool_flags.hpp"
#include <ringflow/ad/autodiff.hpp>
#include <ringflow/backends/mpi.hpp>
#include <ringflow/coll/collectives.hpp>
#include <ringflow/train/data_parallel.hpp>
#include <ringflow/train/timeline.hpp>

namespace ad = ringflow::ad;
namespace rt = ringflow::train;
namespace fs = std::filesystem;

namespace {

rt::overlap_summary analyze(const fs::path& path, int ranks) {
  std::vector<rt::trace_event> all;
  for (int r = 0; r < ranks; ++r) {
    auto evs = rt::read_trace(rt::rank_file(path, r));
    all.insert(all.end(), evs.begin(), evs.end());
  }
  return rt::summarize_overlap(all);
}

void print_row(const std::string& label, const rt::overlap_summary& s, int ranks) {
  const double per = 1e-3 / static_cast<double>(std::max<std::int64_t>(1, s.steps) * ranks);
  fmt::print("| {} | {} | {:.2f} | {:.2f} | {:.2f} | {:.0f}% |\n", label, s.steps,
             s.backward_us * per, s.comm_us * per, s.wait_us * per, 100 * s.hidden_fraction());
}

void header() {
  fmt::print(
      "| run | steps | backward ms/step | allreduce ms/step | waited ms/step | "
      "comm hidden behind backward |\n|---|---|---|---|---|---|\n");
}

}  // namespace

int main(int argc, char** argv) {
  int steps = 20;
  std::string out = (fs::temp_directory_path() / "ringflow_overlap").string();
  std::string analyze_path;
  int analyze_ranks = 1;
  try {
    ringflow::tool_flags::reader flags(argc, argv);
    while (flags.next()) {
      if (flags.is("--steps"))
        steps = static_cast<int>(flags.integer(1, 100000));
      else if (flags.is("--out"))
        out = flags.text();
      else if (flags.is("--analyze"))
        analyze_path = flags.text();
      else if (flags.is("--ranks"))
        analyze_ranks = static_cast<int>(flags.integer(1, 1 << 16));
      else if (flags.is("--help", "-h")) {
        std::printf(
            "bench_overlap [--steps N in [1, 100000]] [--out DIR] | --analyze TRACE.json "
            "--ranks N in [1, 65536]\n");
        return 0;
      } else {
        flags.unknown();
      }
    }
  } catch (const ringflow::tool_flags::bad_flag& e) {
    return ringflow::tool_flags::report("bench_overlap", e);
  }
  if (!analyze_path.empty()) {
    try {
      const auto summary = analyze(analyze_path, analyze_ranks);
      header();
      print_row(analyze_path, summary, analyze_ranks);
    } catch (const ringflow::error& e) {
      std::fprintf(stderr, "bench_overlap: %s\n", e.what());
      return 1;
    }
    return 0;
  }
  ringflow::mpi::environment env(argc, argv);
  auto comm = ringflow::mpi::world();
  if (comm.rank() == 0) fs::create_directories(out);
  ringflow::barrier(comm);

  const std::size_t local = std::max(1, 128 / comm.size());
  std::vector<float> x(local * 784);
  for (std::size_t i = 0; i < x.size(); ++i) {
    x[i] =
        static_cast<float>((i * 37 + static_cast<std::size_t>(comm.rank())) % 101) / 50.0f - 1.0f;
  }
  std::vector<int> y(local);
  for (std::size_t i = 0; i < local; ++i) y[i] = static_cast<int>(i % 10);

  struct config {
    std::string label;
    std::size_t cap;
  };
  const std::vector<config> configs = {
      {fmt::format("buckets of {} KiB", rt::default_bucket_cap_bytes / 1024),
       rt::default_bucket_cap_bytes},
      {"one bucket", std::size_t{1} << 30}};
  for (const auto& c : configs) {
    const fs::path trace =
        fs::path(out) / (c.cap == rt::default_bucket_cap_bytes ? "buckets.json" : "one.json");
    {
      ad::mlp model({784, 1024, 1024, 1024, 10}, ad::activation::relu, 42);
      rt::data_parallel dp(
          comm, model.parameters(),
          {.bucket_cap_bytes = c.cap,
           // "one bucket" is one: no small first bucket either.
           .first_bucket_cap_bytes =
               c.cap == rt::default_bucket_cap_bytes ? rt::default_first_bucket_cap_bytes : c.cap,
           .timeline_path = trace});
      ad::sgd opt(model.parameters(), {.lr = 1e-3});
      for (int s = 0; s < steps; ++s) {
        opt.zero_grad();
        ad::tensor loss;
        {
          auto f = dp.span("forward");
          auto xt = ad::tensor::from_data(x.data(), {static_cast<ad::index>(local), 784});
          loss = ad::softmax_cross_entropy(model(xt), std::span<const int>(y));
        }
        dp.backward(loss);
        dp.step(opt);
      }
    }  // writes the traces
    ringflow::barrier(comm);
    if (comm.rank() == 0) {
      if (&c == &configs.front()) {
        fmt::print(
            "overlap: mlp 784-1024-1024-1024-10 ({:.1f} MB of gradients), batch {} per "
            "rank, {} ranks, {} steps; traces in {}\n",
            (784.0 * 1024 + 1024 * 1024 * 2 + 1024 * 10 + 3 * 1024 + 10) * 4 / 1e6, local,
            comm.size(), steps, out);
        header();
      }
      print_row(c.label, analyze(trace, comm.size()), comm.size());
    }
  }
  return 0;
}
