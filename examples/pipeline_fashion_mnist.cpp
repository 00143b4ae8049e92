// pipeline_fashion_mnist: trains an MLP on Fashion-MNIST with pipeline parallelism (x data
// parallelism).
//
//   mpirun -np 2 build/bin/pipeline_fashion_mnist --schedule 1f1b --micro-batches 4
//   mpirun -np 4 build/bin/pipeline_fashion_mnist --stages 2     # 2 pipelines x 2 stages
//
// Progress goes to stderr; the last line on stdout (rank 0) is test_accuracy=<fraction>.
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "tool_flags.hpp"
#include <ringflow/ad/autodiff.hpp>
#include <ringflow/backends/mpi.hpp>
#include <ringflow/coll/collectives.hpp>
#include <ringflow/core/env.hpp>
#include <ringflow/data/batch.hpp>
#include <ringflow/data/dataset.hpp>
#include <ringflow/data/sampler.hpp>
#include <ringflow/pipeline/executor.hpp>
#include <ringflow/pipeline/stages.hpp>

namespace ad = ringflow::ad;
namespace rd = ringflow::data;
namespace pl = ringflow::pipeline;

namespace {

constexpr int exit_usage = 2;

struct options {
  std::string schedule = "1f1b";
  int stages = 0;  // 0: every rank in one pipeline
  int micro_batches = 4;
  int chunks = 2;
  bool split_backward = false;
  int epochs = 8;
  std::size_t batch = 128;
  double lr = 1e-3;
  std::uint64_t seed = 42;
  std::vector<ad::index> hidden = {256, 128};
  std::vector<std::size_t> split;  // layers per stage; empty: balanced by measured cost
  std::string data_dir;
  std::size_t limit = 0;
  std::string trace;
  bool print_schedule = false;
};

void print_help() {
  std::printf(
      "pipeline_fashion_mnist: train an MLP on Fashion-MNIST with pipeline parallelism and\n"
      "report its test accuracy. Run under mpirun; the world is cut into pipelines of\n"
      "--stages ranks, and the pipelines train data-parallel (gradients of each stage\n"
      "averaged over its replicas).\n"
      "\n"
      "Usage: mpirun -np N pipeline_fashion_mnist [flags]   (--flag value or --flag=value)\n"
      "  --schedule K        gpipe, 1f1b or interleaved (default 1f1b)\n"
      "  --stages S          ranks per pipeline; must divide N (default N: one pipeline)\n"
      "  --micro-batches M   micro-batches per batch (default 4)\n"
      "  --chunks V          model chunks per rank for interleaved (default 2)\n"
      "  --split-backward    run backward as input-grad, send, weight-grad (BI, SG, BW)\n"
      "  --layers A,B,..     layers per stage (default: balanced by measured layer cost)\n"
      "  --epochs N          passes over the training set (default 8)\n"
      "  --batch N           mini-batch size per pipeline (default 128)\n"
      "  --lr X              peak AdamW learning rate, cosine-decayed to 0 (default 1e-3)\n"
      "  --seed N            seed of weights and shuffling (default 42)\n"
      "  --hidden A,B,..     hidden layer widths (default 256,128)\n"
      "  --data-dir DIR      folder with the Fashion-MNIST IDX files\n"
      "                      (default $RINGFLOW_DATA_DIR or /usr/share/datasets/fashion-mnist)\n"
      "  --limit N           load only the first N samples of each split (quick runs)\n"
      "  --trace FILE        write the last training step as a Chrome trace (JSON); also\n"
      "                      taken from $RINGFLOW_TIMELINE\n"
      "  --print-schedule    print the schedule as an ASCII grid (stderr) before training\n"
      "  --help              this text\n"
      "\n"
      "Progress lines go to stderr; the last line on stdout is test_accuracy=<fraction>.\n"
      "A bad flag, or a layout the ranks cannot form, exits with status 2.\n");
}

// Thrown for a bad command line or layout: main prints it and exits with status 2.
using ringflow::tool_flags::bad_flag;

// Returns nullopt when --help was printed.
std::optional<options> parse_args(int argc, char** argv, bool print) {
  options o;
  ringflow::tool_flags::reader flags(argc, argv);
  while (flags.next()) {
    const std::string& arg = flags.flag();
    if (flags.is("--help", "-h")) {
      if (print) print_help();
      return std::nullopt;
    } else if (arg == "--schedule") {
      o.schedule = flags.value();
      if (o.schedule != "gpipe" && o.schedule != "1f1b" && o.schedule != "interleaved") {
        throw bad_flag(
            fmt::format("--schedule expects gpipe, 1f1b or interleaved, got '{}'", o.schedule));
      }
    } else if (arg == "--stages") {
      o.stages = static_cast<int>(flags.integer(1, 4096));
    } else if (arg == "--micro-batches") {
      o.micro_batches = static_cast<int>(flags.integer(1, 4096));
    } else if (arg == "--chunks") {
      o.chunks = static_cast<int>(flags.integer(1, 64));
    } else if (arg == "--split-backward") {
      flags.no_value();
      o.split_backward = true;
    } else if (arg == "--layers") {
      o.split.clear();
      for (long long l : flags.integers(1, 1 << 16, 4096))
        o.split.push_back(static_cast<std::size_t>(l));
    } else if (arg == "--epochs") {
      o.epochs = static_cast<int>(flags.integer(1, 100000));
    } else if (arg == "--batch") {
      o.batch = static_cast<std::size_t>(flags.integer(1, 1 << 20));
    } else if (arg == "--lr") {
      o.lr = flags.number(0, 10, /*lo_open=*/true);
    } else if (arg == "--seed") {
      o.seed = static_cast<std::uint64_t>(flags.integer(0, INT64_MAX));
    } else if (arg == "--hidden") {
      o.hidden.clear();
      for (long long h : flags.integers(1, 1 << 16, 64))
        o.hidden.push_back(static_cast<ad::index>(h));
    } else if (arg == "--data-dir") {
      o.data_dir = flags.text();
    } else if (arg == "--limit") {
      o.limit = static_cast<std::size_t>(flags.integer(1, INT64_MAX));
    } else if (arg == "--trace") {
      o.trace = flags.text();
    } else if (arg == "--print-schedule") {
      flags.no_value();
      o.print_schedule = true;
    } else {
      flags.unknown();
    }
  }
  if (o.trace.empty()) {
    if (auto t = ringflow::env::text("RINGFLOW_TIMELINE")) o.trace = std::move(*t);
  }
  return o;
}

using clock_type = std::chrono::steady_clock;
double seconds_since(clock_type::time_point t) {
  return std::chrono::duration<double>(clock_type::now() - t).count();
}

// Test accuracy by forward passes through pipeline 0 (other pipelines
// idle); the count is summed over the world so every rank returns it.
double accuracy(const ringflow::communicator& world, const pl::grid& g, pl::executor& infer,
                pl::sequential_stages& stages, const rd::dataset& ds) {
  double correct = 0;
  if (g.pipeline_index == 0) {
    const bool last = g.pipeline.rank() == g.pipeline.size() - 1;
    const std::size_t slice = 1000;
    for (std::size_t begin = 0; begin < ds.size(); begin += slice) {
      const std::size_t n = std::min(slice, ds.size() - begin);
      stages.set_batch(ds.sample(begin), static_cast<ad::index>(n));
      infer.run(stages);
      if (!last) continue;
      auto out = ad::tensor::from_matrix(stages.outputs());
      const auto predicted = ad::argmax_rows(out);
      for (std::size_t i = 0; i < n; ++i) correct += predicted[i] == ds.labels[begin + i] ? 1 : 0;
    }
  }
  ringflow::allreduce(world, std::span<double>(&correct, 1), ringflow::sum);
  return correct / static_cast<double>(ds.size());
}

int train(const options& o, ringflow::communicator world) {
  const int stages_per_pipeline = o.stages == 0 ? world.size() : o.stages;
  if (world.size() % stages_per_pipeline != 0) {
    throw bad_flag(fmt::format("--stages {} does not divide the {} ranks (mpirun -np)",
                               stages_per_pipeline, world.size()));
  }
  const auto g = pl::make_grid(world, stages_per_pipeline);
  const bool reporter = world.rank() == stages_per_pipeline - 1;  // last stage of pipeline 0
  const auto sched = pl::make_schedule(o.schedule, stages_per_pipeline, o.micro_batches, o.chunks,
                                       {.split_backward = o.split_backward});
  if (o.batch < static_cast<std::size_t>(o.micro_batches)) {
    throw bad_flag(
        fmt::format("--batch {} is smaller than --micro-batches {}", o.batch, o.micro_batches));
  }

  const auto t_load = clock_type::now();
  auto fm = rd::load_fashion_mnist(
      o.data_dir.empty() ? rd::default_fashion_mnist_dir() : std::filesystem::path(o.data_dir),
      o.limit);
  rd::normalize(fm.train, rd::fashion_mnist_normalization);
  rd::normalize(fm.test, rd::fashion_mnist_normalization);
  if (fm.train.size() / static_cast<std::size_t>(g.pipelines) < o.batch) {
    throw bad_flag(fmt::format("--batch {} is larger than the {} training samples per pipeline",
                               o.batch, fm.train.size() / static_cast<std::size_t>(g.pipelines)));
  }
  const auto features = static_cast<ad::index>(fm.train.features());

  std::vector<ad::index> sizes = {features};
  sizes.insert(sizes.end(), o.hidden.begin(), o.hidden.end());
  sizes.push_back(fm.train.num_classes);
  ad::mlp model(sizes, ad::activation::relu, o.seed);
  const auto total_stages = static_cast<std::size_t>(sched.stages());
  if (model.size() < total_stages) {
    throw bad_flag(fmt::format(
        "the model has {} layers (linear and relu) but '{}' over {} ranks needs {} stages; "
        "add --hidden layers or use fewer --stages / --chunks",
        model.size(), o.schedule, stages_per_pipeline, total_stages));
  }
  std::vector<std::size_t> counts = o.split;
  if (counts.empty()) {
    // Measured on every rank, averaged so all ranks cut the model alike.
    auto costs = pl::measure_layer_costs(model, features, static_cast<ad::index>(o.batch), 3);
    ringflow::allreduce(world, std::span<double>(costs), ringflow::avg);
    counts = pl::balance_layers(costs, sched.stages());
  } else {
    std::size_t sum = 0;
    for (auto c : counts) sum += c;
    if (counts.size() != total_stages || sum != model.size()) {
      throw bad_flag(fmt::format("--layers needs {} counts adding up to {} layers, got {}",
                                 total_stages, model.size(), fmt::join(counts, ",")));
    }
  }

  pl::sequential_stages stages(model, sched, g.pipeline.rank(), counts, features);
  stages.set_data_parallel(g.data);
  rd::sampler sampler(fm.train.size(), g.pipeline_index, g.pipelines, o.seed);
  const std::size_t steps_per_epoch = rd::batch_count(sampler.per_rank(), o.batch, true);
  const auto total_steps = static_cast<std::int64_t>(steps_per_epoch) * o.epochs;
  const auto lr_at =
      ad::warmup_cosine(o.lr, std::min<std::int64_t>(100, total_steps / 10), total_steps);
  std::int64_t step = 0;
  std::optional<ad::adamw> opt;
  if (stages.parameters().numel() > 0) {
    opt.emplace(stages.parameters(), ad::adamw_options{.lr = o.lr, .weight_decay = 1e-4});
  }
  stages.set_optimizer_step([&] {
    if (!opt) return;
    opt->set_lr(lr_at(step));
    opt->step();
  });
  pl::executor ex(g.pipeline, sched, {.trace = !o.trace.empty()});
  pl::executor infer(g.pipeline, pl::forward_pass(sched.stage_rank, stages_per_pipeline, 1));

  if (world.rank() == 0) {
    std::string layout = fmt::format("{}", sizes[0]);
    for (std::size_t i = 1; i < sizes.size(); ++i) layout += fmt::format("-{}", sizes[i]);
    fmt::print(stderr,
               "pipeline_fashion_mnist: {} ranks = {} pipeline(s) x {} stage ranks; schedule {} "
               "({} stages, layers per stage {}), {} micro-batches; mlp {}, batch {} per "
               "pipeline, {} steps/epoch; data loaded in {:.2f}s; predicted bubble {:.3f}\n",
               world.size(), g.pipelines, stages_per_pipeline, sched.name, sched.stages(),
               fmt::join(counts, ","), o.micro_batches, layout, o.batch, steps_per_epoch,
               seconds_since(t_load), ex.prediction().bubble_fraction);
    if (o.print_schedule) fmt::print(stderr, "{}", pl::ascii_grid(sched));
  }

  const auto t_train = clock_type::now();
  double test_acc = 0.0;
  for (int epoch = 0; epoch < o.epochs; ++epoch) {
    sampler.set_epoch(static_cast<std::uint64_t>(epoch));
    rd::prefetcher batches(fm.train, sampler.remaining(), o.batch, {.depth = 2, .drop_last = true});
    rd::batch b;
    const auto t_epoch = clock_type::now();
    double loss_epoch = 0.0;
    const std::size_t report_every = std::max<std::size_t>(1, steps_per_epoch / 4);
    for (std::size_t s = 0; batches.next(b); ++s, ++step) {
      stages.set_batch(b.images.data(), static_cast<ad::index>(b.size()),
                       std::span<const int>(b.labels));
      if (ex.tracing()) ex.clear_events();  // keep the last step only
      ex.run(stages);
      sampler.advance(b.size());
      if (reporter) {
        const double l = stages.loss();
        if (!std::isfinite(l)) {
          throw ringflow::error(
              fmt::format("loss became {} at epoch {} step {}; lower --lr", l, epoch + 1, s + 1));
        }
        loss_epoch += l;
        if ((s + 1) % report_every == 0) {
          fmt::print(stderr, "epoch {}/{} step {}/{} loss {:.4f} lr {:.2e} samples/s {:.0f}\n",
                     epoch + 1, o.epochs, s + 1, steps_per_epoch, l, lr_at(step),
                     static_cast<double>((s + 1) * o.batch * g.pipelines) / seconds_since(t_epoch));
        }
      }
    }
    const double epoch_s = seconds_since(t_epoch);
    test_acc = accuracy(world, g, infer, stages, fm.test);
    if (reporter) {
      fmt::print(stderr, "epoch {}/{} done: train loss {:.4f}, test accuracy {:.4f}, {:.1f}s\n",
                 epoch + 1, o.epochs, loss_epoch / static_cast<double>(steps_per_epoch), test_acc,
                 epoch_s);
    }
  }
  if (!o.trace.empty()) {
    pl::write_chrome_trace(o.trace, world, ex.events());
    if (world.rank() == 0) fmt::print(stderr, "wrote the last step's trace to {}\n", o.trace);
  }
  if (world.rank() == 0) {
    fmt::print(stderr, "trained {} epochs in {:.1f}s\n", o.epochs, seconds_since(t_train));
    std::printf("test_accuracy=%.4f\n", test_acc);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  ringflow::mpi::environment env(argc, argv);
  auto world = ringflow::mpi::world();
  const bool rank0 = world.rank() == 0;
  std::optional<options> o;
  try {
    o = parse_args(argc, argv, rank0);
    if (!o) return 0;
    return train(*o, world);
  } catch (const bad_flag& e) {
    // Every rank sees the same flags and sizes, so all of them stop here.
    return rank0 ? ringflow::tool_flags::report("pipeline_fashion_mnist", e) : exit_usage;
  } catch (const ringflow::usage_error& e) {
    if (rank0) std::fprintf(stderr, "pipeline_fashion_mnist: %s\n", e.what());
    return exit_usage;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "pipeline_fashion_mnist (rank %d): %s\n", world.rank(), e.what());
    ringflow::mpi::abort(1, e.what());
  }
}
