// ps_fashion_mnist: an MLP on Fashion-MNIST trained through the parameter server (ringflow::ps) or,
// for comparison, by allreduce; prints samples/s, test accuracy, staleness and traffic.
//
//   mpirun -np 3 build/bin/ps_fashion_mnist --mode async --servers 1
//   mpirun -np 4 build/bin/ps_fashion_mnist --mode ssp --staleness 2 --slow-worker 1 --slowdown 3
//   mpirun -np 4 build/bin/ps_fashion_mnist --mode local --local-steps 4 --servers 0
//   mpirun -np 3 build/bin/ps_fashion_mnist --mode async --trace /tmp/ps.json   # ps.rank<r>.json
//
// Every worker takes --steps steps of --batch samples from its own part of the
// training set. --servers S: ranks 0..S-1 are dedicated servers; --servers 0:
// every rank serves a shard and works (co-located). The last stdout line is
// test_accuracy=<fraction>; the line before it is one key=value summary.
#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "tool_flags.hpp"
#include <ringflow/ad/autodiff.hpp>
#include <ringflow/backends/mpi.hpp>
#include <ringflow/coll/collectives.hpp>
#include <ringflow/core/log.hpp>
#include <ringflow/data/batch.hpp>
#include <ringflow/data/dataset.hpp>
#include <ringflow/data/sampler.hpp>
#include <ringflow/ps/parameter_server.hpp>

namespace ad = ringflow::ad;
namespace rd = ringflow::data;
namespace ps = ringflow::ps;

namespace {

constexpr int exit_usage = 2;

struct options {
  std::string mode = "sync";  // sync, async, ssp, local, allreduce
  int servers = 1;            // 0: co-located
  int staleness = 1;
  int local_steps = 4;
  int steps = 300;
  std::size_t batch = 32;
  double lr = 0.05;
  std::vector<ad::index> hidden = {128};
  std::uint64_t seed = 42;
  int slow_worker = -1;
  double slowdown = 1.0;
  std::string data_dir;
  std::size_t limit = 0;
  std::string trace;  // empty: $RINGFLOW_TIMELINE or none
};

void print_help() {
  std::printf(
      "ps_fashion_mnist: MLP training on Fashion-MNIST through the parameter server.\n"
      "\n"
      "Usage: mpirun -np N ps_fashion_mnist [flags]   (--flag value or --flag=value)\n"
      "  --mode M            sync, async, ssp, local (local SGD) or allreduce (the data-parallel\n"
      "                      peer: gradients averaged by allreduce over all N ranks) (default "
      "sync)\n"
      "  --servers S         dedicated server ranks 0..S-1 (1 <= S < N), or 0: every rank serves "
      "a\n"
      "                      shard and works (co-located) (default 1; ignored by allreduce)\n"
      "  --staleness s       ssp: a worker at most s pushes ahead of the slowest (default 1)\n"
      "  --local-steps H     local: steps between parameter averages (default 4)\n"
      "  --steps N           steps per worker (default 300)\n"
      "  --batch B           samples per worker per step (default 32)\n"
      "  --lr X              SGD learning rate, momentum 0.9 (default 0.05); async and ssp\n"
      "                      servers step every push at X / workers\n"
      "  --hidden A,B,..     hidden layer widths (default 128)\n"
      "  --seed N            weights and shuffling (default 42)\n"
      "  --slow-worker R     rank R computes --slowdown times slower: after each step's\n"
      "                      forward/backward it idles (slowdown - 1) x that step's compute time,\n"
      "                      as a slower machine would (default -1: none)\n"
      "  --slowdown X        factor for --slow-worker, >= 1 (default 3)\n"
      "  --data-dir DIR      Fashion-MNIST IDX files (default $RINGFLOW_DATA_DIR or\n"
      "                      /usr/share/datasets/fashion-mnist)\n"
      "  --limit N           load only the first N samples of each split\n"
      "  --trace FILE        Chrome trace of every push, pull, apply and serve, one file per\n"
      "                      rank (FILE.rank<r>.json); also $RINGFLOW_TIMELINE\n"
      "  --help              this text\n");
}

using ringflow::tool_flags::bad_flag;

std::optional<options> parse_args(int argc, char** argv) {
  options o;
  bool slowdown_given = false;
  ringflow::tool_flags::reader flags(argc, argv);
  while (flags.next()) {
    const std::string& arg = flags.flag();
    if (flags.is("--help", "-h")) {
      return std::nullopt;
    } else if (arg == "--mode") {
      o.mode = flags.value();
      if (o.mode != "sync" && o.mode != "async" && o.mode != "ssp" && o.mode != "local" &&
          o.mode != "allreduce") {
        throw bad_flag(
            fmt::format("--mode expects sync, async, ssp, local or allreduce, got '{}'", o.mode));
      }
    } else if (arg == "--servers") {
      o.servers = static_cast<int>(flags.integer(0, 4096));
    } else if (arg == "--staleness") {
      o.staleness = static_cast<int>(flags.integer(0, 1 << 20));
    } else if (arg == "--local-steps") {
      o.local_steps = static_cast<int>(flags.integer(1, 1 << 20));
    } else if (arg == "--steps") {
      o.steps = static_cast<int>(flags.integer(1, 1 << 24));
    } else if (arg == "--batch") {
      o.batch = static_cast<std::size_t>(flags.integer(1, 1 << 16));
    } else if (arg == "--lr") {
      o.lr = flags.number(0, 10, /*lo_open=*/true);
    } else if (arg == "--hidden") {
      o.hidden.clear();
      for (long long h : flags.integers(1, 1 << 16, 64))
        o.hidden.push_back(static_cast<ad::index>(h));
    } else if (arg == "--seed") {
      o.seed = static_cast<std::uint64_t>(flags.integer(0, INT64_MAX));
    } else if (arg == "--slow-worker") {
      o.slow_worker = static_cast<int>(flags.integer(-1, 1 << 20));
    } else if (arg == "--slowdown") {
      o.slowdown = flags.number(1, 1000);
      slowdown_given = true;
    } else if (arg == "--data-dir") {
      o.data_dir = flags.text();
    } else if (arg == "--limit") {
      o.limit = static_cast<std::size_t>(flags.integer(1, INT64_MAX));
    } else if (arg == "--trace") {
      o.trace = flags.text();
    } else {
      flags.unknown();
    }
  }
  if (o.slow_worker >= 0 && !slowdown_given) o.slowdown = 3.0;
  return o;
}

using clock_type = std::chrono::steady_clock;
double seconds_since(clock_type::time_point t) {
  return std::chrono::duration<double>(clock_type::now() - t).count();
}

double accuracy(ad::module& model, const rd::dataset& ds) {
  ad::no_grad guard;
  model.eval();
  std::size_t correct = 0;
  for (std::size_t begin = 0; begin < ds.size(); begin += 500) {
    const std::size_t n = std::min<std::size_t>(500, ds.size() - begin);
    auto x = ad::tensor::from_data(
        ds.sample(begin), {static_cast<ad::index>(n), static_cast<ad::index>(ds.features())});
    const auto predicted = ad::argmax_rows(model(x));
    for (std::size_t i = 0; i < n; ++i) correct += predicted[i] == ds.labels[begin + i] ? 1 : 0;
  }
  model.train();
  return static_cast<double>(correct) / static_cast<double>(ds.size());
}

int run(const options& o, const ringflow::communicator& comm) {
  const int rank = comm.rank(), np = comm.size();
  const bool allreduce_mode = o.mode == "allreduce";
  ps::options po;
  if (!allreduce_mode) {
    po.mode = ps::parse_consistency(o.mode);
    po.where = o.servers == 0 ? ps::placement::colocated : ps::placement::dedicated;
    po.servers = o.servers;
    po.staleness = o.staleness;
    po.local_steps = o.local_steps;
    po.optimizer.sgd = {.lr = o.lr, .momentum = 0.9};
    po.timeline_path = o.trace;  // empty: the node reads $RINGFLOW_TIMELINE
  }
  if (!allreduce_mode) {
    try {
      (void)ps::layout(1 << 20, np, po, rank);
    } catch (const ringflow::usage_error& e) {
      throw ringflow::usage_error(fmt::format("--servers {}: {}", o.servers, e.what()));
    }
  }
  const int workers = allreduce_mode ? np : ps::layout(1 << 20, np, po, rank).workers();
  // async/ssp apply every push as its own step: W pushes at lr / W move as
  // far as one synchronous step of the W-gradient average at lr.
  if (po.mode == ps::consistency::async || po.mode == ps::consistency::ssp) {
    po.optimizer.sgd.lr = o.lr / workers;
  }
  const int worker = allreduce_mode ? rank : ps::layout(1 << 20, np, po, rank).worker_index(rank);
  if (o.slow_worker >= np) {
    throw ringflow::usage_error(
        fmt::format("--slow-worker {}: there are only {} ranks", o.slow_worker, np));
  }

  auto fm = rd::load_fashion_mnist(
      o.data_dir.empty() ? rd::default_fashion_mnist_dir() : std::filesystem::path(o.data_dir),
      o.limit);
  rd::normalize(fm.train, rd::fashion_mnist_normalization);
  rd::normalize(fm.test, rd::fashion_mnist_normalization);

  std::vector<ad::index> sizes = {static_cast<ad::index>(fm.train.features())};
  sizes.insert(sizes.end(), o.hidden.begin(), o.hidden.end());
  sizes.push_back(static_cast<ad::index>(fm.train.num_classes));
  ad::sequential model(ad::mlp(sizes, ad::activation::relu, o.seed));
  auto params = model.parameters();
  const auto values = params.all_values();
  const auto grads = params.all_grads();
  const std::vector<float> initial(values.begin(), values.end());

  std::optional<ps::node> node;
  if (!allreduce_mode) node.emplace(comm, initial, po);
  // Local optimizers: local SGD and allreduce step their own copy.
  std::optional<ad::sgd> own;
  if (allreduce_mode || po.mode == ps::consistency::local_sgd) {
    own.emplace(params, ad::sgd_options{.lr = o.lr, .momentum = 0.9});
  }

  const bool slowed = rank == o.slow_worker && worker >= 0;
  std::uint64_t samples = 0, bytes = 0;
  double wall = 0;
  // Everyone starts together.
  std::vector<int> sync_point{0};
  ringflow::allreduce(comm, std::span<int>(sync_point), ringflow::sum);
  const auto t0 = clock_type::now();
  if (worker >= 0) {
    rd::sampler sampler(fm.train.size(), worker, workers, o.seed);
    rd::batch b;
    std::size_t pos = 0;
    std::uint64_t epoch = 0;
    if (node && po.mode != ps::consistency::local_sgd) node->pull(values).wait();
    for (int step = 0; step < o.steps; ++step) {
      if (pos + o.batch > sampler.per_rank()) {
        sampler.set_epoch(++epoch);
        pos = 0;
      }
      rd::assemble_batch(fm.train,
                         std::span<const std::size_t>(sampler.indices()).subspan(pos, o.batch), b);
      pos += o.batch;
      const auto t_compute = clock_type::now();
      params.zero_grad();
      auto x = ad::tensor::from_data(b.images.data(), {static_cast<ad::index>(b.size()),
                                                       static_cast<ad::index>(b.images.cols())});
      auto loss = ad::softmax_cross_entropy(model(x), std::span<const int>(b.labels));
      loss.backward();
      if (slowed) {
        std::this_thread::sleep_for(
            std::chrono::duration<double>(seconds_since(t_compute) * (o.slowdown - 1.0)));
      }
      if (allreduce_mode) {
        ringflow::allreduce(comm, grads, ringflow::avg);
        bytes += 2 * grads.size_bytes() * static_cast<std::size_t>(np - 1) /
                 static_cast<std::size_t>(np);
        own->step();
      } else if (po.mode == ps::consistency::local_sgd) {
        own->step();
        node->average(values, step);
      } else {
        node->push(grads).wait();
        node->pull(values).wait();
      }
      samples += b.size();
    }
    if (node) {
      bytes = node->bytes_sent();
      node->finish();
    }
    wall = seconds_since(t0);
  } else {
    node->serve();
    wall = seconds_since(t0);
  }
  if (node && !node->timeline_file().empty()) {
    node->write_timeline();
    if (rank == 0) {
      fmt::print(stderr,
                 "ps_fashion_mnist: wrote the ps trace, one file per rank: {} and beside it\n",
                 node->timeline_file().string());
    }
  }
  if (node) {
    std::vector<float> final_params(values.begin(), values.end());
    node->gather_parameters(final_params);
    std::copy(final_params.begin(), final_params.end(), values.begin());
  }

  // Reports: sums over ranks of [staleness buckets][per server: updates, pushes,
  // pulls, bytes received, bytes sent, pushes of each worker][samples, bytes].
  const int S = node ? node->roles().servers() : 0;
  const std::size_t per_server = 5 + static_cast<std::size_t>(workers);
  const auto load_at = [&](int s) {
    return ps::staleness_buckets + static_cast<std::size_t>(s) * per_server;
  };
  std::vector<double> t(load_at(S) + 2, 0.0);
  if (node && node->is_server() && po.mode != ps::consistency::local_sgd) {
    const auto& st = node->stats();
    for (std::size_t k = 0; k < ps::staleness_buckets; ++k)
      t[k] = static_cast<double>(st.staleness[k]);
    double* load = &t[load_at(node->server_index())];
    load[0] = static_cast<double>(st.updates);
    load[1] = static_cast<double>(st.pushes);
    load[2] = static_cast<double>(st.pulls);
    load[3] = static_cast<double>(st.bytes_received);
    load[4] = static_cast<double>(st.bytes_sent);
    for (std::size_t w = 0; w < st.pushes_by_worker.size(); ++w)
      load[5 + w] = static_cast<double>(st.pushes_by_worker[w]);
    for (std::size_t d = 0; d < st.dropped.size(); ++d) {
      ringflow::log::warn("ps_fashion_mnist: server rank {} dropped worker rank {}: {}", rank,
                          st.dropped[d], st.drop_reasons[d]);
    }
  }
  t[t.size() - 2] = static_cast<double>(samples);
  t[t.size() - 1] = static_cast<double>(bytes);
  ringflow::allreduce(comm, std::span<double>(t), ringflow::sum);
  std::vector<double> longest{wall};
  ringflow::allreduce(comm, std::span<double>(longest), ringflow::max);

  if (rank == 0) {
    const double acc = accuracy(model, fm.test);
    const double total_samples = t[t.size() - 2];
    std::string where = allreduce_mode   ? std::string("allreduce over all ranks")
                        : o.servers == 0 ? fmt::format("{} co-located server/worker ranks", np)
                                         : fmt::format("{} server(s), {} worker(s)", S, workers);
    fmt::print("ps_fashion_mnist: mode {}{}, {}; {} steps x {} samples per worker; {} parameters\n",
               o.mode,
               o.mode == "ssp"     ? fmt::format(" (s={})", o.staleness)
               : o.mode == "local" ? fmt::format(" (H={})", o.local_steps)
                                   : std::string(),
               where, o.steps, o.batch, values.size());
    if (o.slow_worker >= 0) {
      fmt::print("slowed worker: rank {} x{}\n", o.slow_worker, o.slowdown);
    }
    if (node && po.mode != ps::consistency::local_sgd) {
      std::string hist;
      for (std::size_t k = 0; k < ps::staleness_buckets; ++k) {
        if (t[k] > 0)
          hist += fmt::format(" {}{}:{:.0f}", k, k + 1 == ps::staleness_buckets ? "+" : "", t[k]);
      }
      fmt::print("staleness histogram (updates between a gradient's pull and its apply):{}\n",
                 hist);
      std::string counts;
      for (int s = 0; s < S; ++s) counts += fmt::format(" {}:{:.0f}", s, t[load_at(s)]);
      fmt::print("updates per server:{}\n", counts);
      for (int s = 0; s < S; ++s) {
        const double* load = &t[load_at(s)];
        std::string by_worker;
        for (int w = 0; w < workers; ++w)
          by_worker += fmt::format("{}{:.0f}", w == 0 ? "" : "/", load[5 + w]);
        fmt::print(
            "server {} load: updates {:.0f}, pushes {:.0f} (per worker {}), pulls answered "
            "{:.0f}, received {:.2f} MB, sent {:.2f} MB\n",
            s, load[0], load[1], by_worker, load[2], load[3] / 1e6, load[4] / 1e6);
      }
    }
    fmt::print(
        "mode={} servers={} workers={} samples_per_s={:.0f} bytes_per_sample={:.0f} "
        "wall_s={:.2f}\n",
        o.mode, allreduce_mode ? 0 : S, workers, total_samples / longest[0],
        t[t.size() - 1] / std::max(1.0, total_samples), longest[0]);
    fmt::print("test_accuracy={:.4f}\n", acc);
    std::fflush(stdout);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  ringflow::mpi::environment env(argc, argv);
  auto comm = ringflow::mpi::world();
  std::optional<options> o;
  try {
    o = parse_args(argc, argv);
  } catch (const bad_flag& e) {
    return comm.rank() == 0 ? ringflow::tool_flags::report("ps_fashion_mnist", e) : exit_usage;
  }
  if (!o) {
    if (comm.rank() == 0) print_help();
    return 0;
  }
  try {
    return run(*o, comm);
  } catch (const ringflow::usage_error& e) {
    if (comm.rank() == 0) std::fprintf(stderr, "ps_fashion_mnist: %s\n", e.what());
    return exit_usage;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "ps_fashion_mnist (rank %d): %s\n", comm.rank(), e.what());
    return 1;
  }
}
