// train_fashion_mnist: data-parallel MLP (default) or CNN training on Fashion-MNIST over MPI ranks;
// prints the test accuracy.
//
//   mpirun -np 4 build/bin/train_fashion_mnist --epochs 6 --batch 128
//   mpirun -np 4 build/bin/train_fashion_mnist --checkpoint-dir ck --resume
//
// --batch is the GLOBAL batch: each of the N ranks takes batch/N samples per
// step, so the optimization is the same whatever N is. Rank 0 reports on
// stderr (a live bar on a terminal, plain lines otherwise); the last line on
// its stdout is test_accuracy=<fraction>.
#include <fmt/format.h>
#include <unistd.h>

#include <Eigen/Core>
#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "mpi_example_main.hpp"
#include "tool_flags.hpp"
#include <ringflow/ad/autodiff.hpp>
#include <ringflow/backends/mpi.hpp>
#include <ringflow/coll/collectives.hpp>
#include <ringflow/compress/compressor.hpp>
#include <ringflow/data/batch.hpp>
#include <ringflow/data/dataset.hpp>
#include <ringflow/data/sampler.hpp>
#include <ringflow/train/checkpoint.hpp>
#include <ringflow/train/data_parallel.hpp>
#include <ringflow/train/sharded_data_parallel.hpp>

namespace ad = ringflow::ad;
namespace rd = ringflow::data;
namespace rt = ringflow::train;

namespace {

constexpr int exit_usage = 2;

struct options {
  int epochs = 6;
  std::size_t batch = 128;
  double lr = 1e-3;
  std::uint64_t seed = 42;
  std::string model = "mlp";
  std::vector<ad::index> hidden = {256, 128};
  std::vector<ad::index> channels = {16, 32};
  int threads = 1;
  std::string data_dir;
  std::size_t limit = 0;
  std::string checkpoint_dir;
  bool resume = false;
  std::int64_t checkpoint_every = 0;
  int stop_after = 0;  // 0: run all --epochs
  std::size_t bucket_kib = rt::default_bucket_cap_bytes / 1024;
  std::string progress = "auto";
  ringflow::algo algorithm = ringflow::algo::automatic;
  std::string compress = "none";
  int zero = 0;
};

void print_help() {
  std::printf(
      "train_fashion_mnist: data-parallel MLP or CNN training on Fashion-MNIST; reports test "
      "accuracy.\n"
      "\n"
      "Usage: mpirun -np N train_fashion_mnist [flags]   (--flag value or --flag=value)\n"
      "  --epochs N             passes over the training set (default 6)\n"
      "  --batch N              GLOBAL mini-batch, split evenly over the N ranks (default 128;\n"
      "                         must be a multiple of the rank count)\n"
      "  --lr X                 peak AdamW learning rate, warm-up then cosine to 0 (default 1e-3)\n"
      "  --seed N               seed of weights and shuffling (default 42)\n"
      "  --model NAME           mlp, or cnn: [conv3x3 pad 1, relu, maxpool 2] per --channels,\n"
      "                         then linear 128, relu, linear 10 (default mlp)\n"
      "  --hidden A,B,..        hidden layer widths of the mlp, comma-separated (default 256,128)\n"
      "  --channels A,B,..      conv channels of the cnn, one block each (default 16,32)\n"
      "  --threads N            threads per rank for the matrix products (default 1)\n"
      "  --data-dir DIR         folder with the Fashion-MNIST IDX files\n"
      "                         (default $RINGFLOW_DATA_DIR or /usr/share/datasets/fashion-mnist)\n"
      "  --limit N              load only the first N samples of each split (quick runs)\n"
      "  --checkpoint-dir DIR   save DIR/checkpoint.rfck (atomically) after every epoch\n"
      "  --checkpoint-every N   ... and every N steps\n"
      "  --resume               continue from DIR/checkpoint.rfck (needs --checkpoint-dir)\n"
      "  --stop-after E         stop after epoch E (the schedule still spans --epochs): the\n"
      "                         first half of an interrupted run, for --resume to finish\n"
      "  --bucket-kib N         gradient bucket cap in KiB (default %zu)\n"
      "  --progress MODE        auto (a bar on a terminal), bar, lines or none (default auto)\n"
      "  --algo NAME            bucket allreduce: auto, ring or native (MPI_Allreduce) (default "
      "auto)\n"
      "  --compress SPEC        gradient compression per bucket: none, fp16, bf16, int8[:block],\n"
      "                         topk:<ratio in (0,1]>, sign[:block], powersgd:<rank>, or auto\n"
      "                         (the cost model picks per bucket) (default none; see\n"
      "                         docs/compression.md); bytes sent are reported at the end\n"
      "  --zero STAGE           0: plain data parallel; 1: optimizer state sharded over the\n"
      "                         ranks; 2: gradients too; 3: parameters too, gathered layer\n"
      "                         bucket by bucket when used (ZeRO; bitwise equal to 0 with\n"
      "                         --algo ring; docs/training.md) (default 0). Memory per rank\n"
      "                         and bytes per step are reported at the end. Checkpoints of\n"
      "                         any stage resume at any rank count and stage\n"
      "  --help                 this text\n"
      "\n"
      "Environment: RINGFLOW_TIMELINE=trace.json writes a Chrome trace per rank\n"
      "(trace.rank0.json, ...). The last line on stdout is test_accuracy=<fraction>.\n",
      rt::default_bucket_cap_bytes / 1024);
}

using ringflow::tool_flags::bad_flag;

// Returns nullopt when --help was asked for; throws bad_flag (one line
// naming the flag and its range; main exits with status 2).
std::optional<options> parse_args(int argc, char** argv) {
  options o;
  ringflow::tool_flags::reader flags(argc, argv);
  while (flags.next()) {
    const std::string& arg = flags.flag();
    if (flags.is("--help", "-h")) {
      return std::nullopt;
    } else if (arg == "--epochs") {
      o.epochs = static_cast<int>(flags.integer(1, 100000));
    } else if (arg == "--batch") {
      o.batch = static_cast<std::size_t>(flags.integer(1, 1 << 20));
    } else if (arg == "--lr") {
      o.lr = flags.number(0, 10, /*lo_open=*/true);
    } else if (arg == "--seed") {
      o.seed = static_cast<std::uint64_t>(flags.integer(0, INT64_MAX));
    } else if (arg == "--model") {
      o.model = flags.value();
      if (o.model != "mlp" && o.model != "cnn") {
        throw bad_flag(fmt::format("--model expects mlp or cnn, got '{}'", o.model));
      }
    } else if (arg == "--channels") {
      o.channels.clear();
      for (long long c : flags.integers(1, 1 << 12, 8))
        o.channels.push_back(static_cast<ad::index>(c));
    } else if (arg == "--hidden") {
      o.hidden.clear();
      for (long long h : flags.integers(1, 1 << 16, 64))
        o.hidden.push_back(static_cast<ad::index>(h));
    } else if (arg == "--threads") {
      o.threads = static_cast<int>(flags.integer(1, 1024));
    } else if (arg == "--data-dir") {
      o.data_dir = flags.text();
    } else if (arg == "--limit") {
      o.limit = static_cast<std::size_t>(flags.integer(1, INT64_MAX));
    } else if (arg == "--checkpoint-dir") {
      o.checkpoint_dir = flags.text();
    } else if (arg == "--checkpoint-every") {
      o.checkpoint_every = flags.integer(1, INT64_MAX);
    } else if (arg == "--stop-after") {
      o.stop_after = static_cast<int>(flags.integer(1, 1000000));
    } else if (arg == "--resume") {
      flags.no_value();
      o.resume = true;
    } else if (arg == "--bucket-kib") {
      o.bucket_kib = static_cast<std::size_t>(flags.integer(0, 1 << 22));
    } else if (arg == "--algo") {
      const std::string name = flags.value();
      try {
        o.algorithm = ringflow::parse_algo(name);
      } catch (const ringflow::usage_error&) {
        throw bad_flag(fmt::format("--algo expects auto, ring or native, got '{}'", name));
      }
    } else if (arg == "--compress") {
      o.compress = flags.value();
      if (o.compress != "auto") {
        try {
          ringflow::compress::make_compressor(o.compress);
        } catch (const ringflow::usage_error& e) {
          throw bad_flag(fmt::format("--compress '{}' (or auto): {}", o.compress, e.what()));
        }
      }
    } else if (arg == "--zero") {
      o.zero = static_cast<int>(flags.integer(0, 3));
    } else if (arg == "--progress") {
      o.progress = flags.value();
      if (o.progress != "auto" && o.progress != "bar" && o.progress != "lines" &&
          o.progress != "none") {
        throw bad_flag(
            fmt::format("--progress expects auto, bar, lines or none, got '{}'", o.progress));
      }
    } else {
      flags.unknown();
    }
  }
  if (o.resume && o.checkpoint_dir.empty()) throw bad_flag("--resume needs --checkpoint-dir");
  if (o.zero > 0) {
    if (o.compress != "none") {
      throw bad_flag(
          "--compress: gradient compression is not available with --zero 1|2|3; use "
          "--zero 0");
    }
    if (o.algorithm != ringflow::algo::automatic && o.algorithm != ringflow::algo::ring) {
      throw bad_flag(
          "--algo: --zero 1|2|3 runs ring reduce-scatters and allgathers; use auto or ring");
    }
  }
  if (o.checkpoint_every > 0 && o.checkpoint_dir.empty()) {
    throw bad_flag("--checkpoint-every needs --checkpoint-dir");
  }
  return o;
}

// The model --model names. The cnn sees each 784-pixel row as a 1x28x28 image;
// each block halves the image (28 -> 14 -> 7 ...).
ad::sequential build_model(const options& o, ad::index features, ad::index classes) {
  if (o.model == "mlp") {
    std::vector<ad::index> sizes = {features};
    sizes.insert(sizes.end(), o.hidden.begin(), o.hidden.end());
    sizes.push_back(classes);
    ad::mlp m(sizes, ad::activation::relu, o.seed);
    return ad::sequential(std::move(m));
  }
  ad::index side = 28;
  if (features != side * side) {
    throw ringflow::usage_error(
        fmt::format("--model cnn: needs 28x28 images; the data has {} features", features));
  }
  ad::sequential net;
  net.add(ad::reshape_layer({1, side, side}));
  ad::index in = 1;
  std::uint64_t seed = o.seed;
  for (ad::index c : o.channels) {
    if (side < 2) {
      throw ringflow::usage_error(fmt::format(
          "--channels: {} blocks halve 28x28 to nothing; use at most 4", o.channels.size()));
    }
    net.add(ad::conv2d_layer(in, c, 3, /*stride=*/1, /*padding=*/1, seed++));
    net.add(ad::activation_layer(ad::activation::relu));
    net.add(ad::max_pool2d_layer(2));
    in = c;
    side /= 2;
  }
  net.add(ad::flatten_layer());
  net.add(ad::linear(in * side * side, 128, seed++));
  net.add(ad::activation_layer(ad::activation::relu));
  net.add(ad::linear(128, classes, seed++));
  return net;
}

using clock_type = std::chrono::steady_clock;
double seconds_since(clock_type::time_point t) {
  return std::chrono::duration<double>(clock_type::now() - t).count();
}

// Test accuracy over all ranks: rank r classifies slices r, r + N, ... of the
// test set (viewed in place) and the correct counts are summed.
double accuracy(const ringflow::communicator& comm, ad::module& model, const rd::dataset& ds) {
  ad::no_grad guard;
  model.eval();
  const std::size_t slice = 500;
  std::array<double, 2> counts{0, 0};  // correct, seen
  std::size_t k = 0;
  for (std::size_t begin = 0; begin < ds.size(); begin += slice, ++k) {
    if (static_cast<int>(k % static_cast<std::size_t>(comm.size())) != comm.rank()) continue;
    const std::size_t n = std::min(slice, ds.size() - begin);
    auto x = ad::tensor::from_data(
        ds.sample(begin), {static_cast<ad::index>(n), static_cast<ad::index>(ds.features())});
    const auto predicted = ad::argmax_rows(model(x));
    for (std::size_t i = 0; i < n; ++i) counts[0] += predicted[i] == ds.labels[begin + i] ? 1 : 0;
    counts[1] += static_cast<double>(n);
  }
  ringflow::allreduce(comm, std::span<double>(counts), ringflow::sum);
  model.train();
  return counts[0] / counts[1];
}

// Rank 0's report: a bar redrawn in place on a terminal, or plain lines.
class progress_report {
 public:
  progress_report(bool active, std::string mode) : active_(active) {
    bar_ = mode == "bar" || (mode == "auto" && ::isatty(STDERR_FILENO) != 0);
    quiet_ = mode == "none";
  }
  bool bar() const { return bar_; }

  struct window {
    int epoch, epochs;
    std::size_t step, steps;
    double loss, acc, samples_per_s, comm_share, hidden;
  };

  void update(const window& w) {
    if (!active_ || quiet_) return;
    if (bar_) {
      const int width = 24;
      const int filled = static_cast<int>(width * static_cast<double>(w.step) /
                                          static_cast<double>(std::max<std::size_t>(1, w.steps)));
      fmt::print(stderr,
                 "\r\033[Kepoch {}/{} [{}{}] {:3.0f}% loss {:.4f} acc {:.3f} {:.0f} samples/s "
                 "comm {:.0f}% ({:.0f}% hidden)",
                 w.epoch, w.epochs, std::string(static_cast<std::size_t>(filled), '#'),
                 std::string(static_cast<std::size_t>(width - filled), '.'),
                 100.0 * static_cast<double>(w.step) / static_cast<double>(w.steps), w.loss, w.acc,
                 w.samples_per_s, 100 * w.comm_share, 100 * w.hidden);
      std::fflush(stderr);
    } else {
      fmt::print(stderr,
                 "epoch {}/{} step {}/{} loss {:.4f} acc {:.3f} samples/s {:.0f} comm {:.1f}% "
                 "({:.0f}% hidden)\n",
                 w.epoch, w.epochs, w.step, w.steps, w.loss, w.acc, w.samples_per_s,
                 100 * w.comm_share, 100 * w.hidden);
    }
  }
  // A line that stays (epoch summaries, messages).
  template <class... Args>
  void line(fmt::format_string<Args...> f, Args&&... args) {
    if (!active_) return;
    if (bar_) fmt::print(stderr, "\r\033[K");
    fmt::print(stderr, f, std::forward<Args>(args)...);
    fmt::print(stderr, "\n");
  }

 private:
  bool active_;
  bool bar_ = false;
  bool quiet_ = false;
};

int train(const options& o, const ringflow::communicator& comm) {
  const int rank = comm.rank(), np = comm.size();
  progress_report report(rank == 0, o.progress);
  if (o.batch % static_cast<std::size_t>(np) != 0) {
    if (rank == 0) {
      std::fprintf(stderr,
                   "train_fashion_mnist: --batch %zu (global) is not a multiple of the %d ranks; "
                   "pick a multiple, e.g. %zu\n",
                   o.batch, np,
                   (o.batch / static_cast<std::size_t>(np) + 1) * static_cast<std::size_t>(np));
    }
    return exit_usage;
  }
  const std::size_t local_batch = o.batch / static_cast<std::size_t>(np);
  ad::set_threads(o.threads);
  const auto t_load = clock_type::now();
  auto fm = rd::load_fashion_mnist(
      o.data_dir.empty() ? rd::default_fashion_mnist_dir() : std::filesystem::path(o.data_dir),
      o.limit);
  rd::normalize(fm.train, rd::fashion_mnist_normalization);
  rd::normalize(fm.test, rd::fashion_mnist_normalization);
  if (fm.train.size() < o.batch) {
    throw ringflow::usage_error(
        fmt::format("--batch {} is larger than the {} training samples", o.batch, fm.train.size()));
  }

  ad::sequential model = build_model(o, static_cast<ad::index>(fm.train.features()),
                                     static_cast<ad::index>(fm.train.num_classes));
  // --zero 0: data_parallel, the optimizer over the whole model; 1, 2, 3: the
  // sharded trainer, the optimizer over this rank's shard only.
  std::optional<rt::data_parallel> dp;
  std::optional<rt::sharded_data_parallel> sdp;
  const std::size_t cap = o.bucket_kib * 1024;
  const std::size_t first_cap = std::min(cap, rt::default_first_bucket_cap_bytes);
  if (o.zero == 0) {
    dp.emplace(comm, model.parameters(),
               rt::data_parallel_options{.bucket_cap_bytes = cap,
                                         .first_bucket_cap_bytes = first_cap,
                                         .coll = {.algorithm = o.algorithm},
                                         .compress = o.compress,
                                         .compress_options = {.seed = o.seed}});
  } else {
    sdp.emplace(comm, model.parameters(),
                rt::sharded_data_parallel_options{.stage = o.zero,
                                                  .bucket_cap_bytes = cap,
                                                  .first_bucket_cap_bytes = first_cap,
                                                  .coll = {.algorithm = o.algorithm}});
  }
  ad::adamw opt(dp ? model.parameters() : sdp->shard(), {.lr = o.lr, .weight_decay = 1e-4});
  rd::sampler sampler(fm.train.size(), rank, np, o.seed);
  const std::size_t steps_per_epoch = rd::batch_count(sampler.per_rank(), local_batch, true);
  const auto total_steps = static_cast<std::int64_t>(steps_per_epoch) * o.epochs;
  const auto schedule =
      ad::warmup_cosine(o.lr, std::min<std::int64_t>(100, total_steps / 10), total_steps);

  // Checkpoint: everything needed to continue exactly where a run stopped.
  rt::training_state state{
      .params = model.parameters(),
      // Sharded: this rank's pieces, gathered into the
      // full layout on save (any rank count resumes).
      .optimizer = sdp ? rt::optimizer_state_of(opt, sdp->owned()) : rt::optimizer_state_of(opt),
      .sampler = &sampler,
      .step = 0,
      .world_size = np,
      .extra = {},
      // Residuals, counters, warm starts: a compressed
      // run resumes bit for bit (at the same rank count).
      .compression = dp ? dp->bucket_compression() : nullptr};
  const std::filesystem::path ckpt =
      o.checkpoint_dir.empty() ? std::filesystem::path()
                               : std::filesystem::path(o.checkpoint_dir) / "checkpoint.rfck";
  if (!ckpt.empty() && rank == 0) std::filesystem::create_directories(ckpt.parent_path());
  int start_epoch = 0;
  bool resumed = false;
  // --zero 3: the parameters are whole only inside full_parameters()
  // (collective): evaluation and checkpoints run there. Otherwise an empty scope.
  const auto whole = [&] { return sdp ? sdp->full_parameters() : rt::full_parameters_scope(); };
  if (o.resume) {
    const auto info = [&] {
      const auto full = whole();
      return rt::load_checkpoint(comm, ckpt, state);
    }();
    const std::string saved_batch =
        state.extra.count("global_batch") ? state.extra["global_batch"] : "?";
    if (saved_batch != std::to_string(o.batch)) {
      throw ringflow::usage_error(fmt::format(
          "--resume: '{}' was trained with --batch {}, this run has --batch {}; use the same "
          "global batch",
          ckpt.string(), saved_batch, o.batch));
    }
    resumed = true;
    start_epoch = static_cast<int>(sampler.epoch());
    if (sampler.position() + local_batch > sampler.per_rank()) ++start_epoch;  // epoch was done
    report.line(
        "train_fashion_mnist: resumed from '{}' at step {} (epoch {}, sample {} of {} "
        "per rank; written by {} rank(s))",
        ckpt.string(), state.step, start_epoch + 1, sampler.position(), sampler.per_rank(),
        info.world_size);
  }
  state.extra["global_batch"] = std::to_string(o.batch);
  state.extra["seed"] = std::to_string(o.seed);

  std::string layout = fmt::format("{}", fm.train.features());
  if (o.model == "mlp") {
    for (ad::index h : o.hidden) layout += fmt::format("-{}", h);
  } else {
    for (ad::index c : o.channels) layout += fmt::format("-conv{}", c);
    layout += "-128";
  }
  layout += fmt::format("-{}", fm.train.num_classes);
  report.line(
      "train_fashion_mnist: {} rank(s); {} train / {} test samples loaded in {:.2f}s; {} "
      "{} ({} parameters, {} gradient buckets); global batch {} ({} per rank), {} "
      "steps/epoch, AdamW lr {} warm-up + cosine; gradient compression {}; zero stage {}; "
      "products: {}",
      np, fm.train.size(), fm.test.size(), seconds_since(t_load), o.model, layout,
      model.parameters().numel(), dp ? dp->buckets().size() : sdp->buckets().size(), o.batch,
      local_batch, steps_per_epoch, o.lr, o.compress, o.zero, ad::gemm_backend());

  const auto save = [&] {
    if (ckpt.empty()) return;
    const auto full = whole();
    rt::save_checkpoint(comm, ckpt, state);
  };

  const auto t_train = clock_type::now();
  double test_acc = 0.0;
  const std::size_t report_every = report.bar() ? std::max<std::size_t>(1, steps_per_epoch / 50)
                                                : std::max<std::size_t>(1, steps_per_epoch / 4);
  std::uint64_t bytes_last_step = 0;
  const auto run_epochs = [&](auto& trainer) {
    const int last = o.stop_after > 0 ? std::min(o.stop_after, o.epochs) : o.epochs;
    for (int epoch = start_epoch; epoch < last; ++epoch) {
      if (!(resumed && epoch == static_cast<int>(sampler.epoch()))) {
        sampler.set_epoch(static_cast<std::uint64_t>(epoch));
      }
      rd::prefetcher batches(fm.train, sampler.remaining(), local_batch,
                             {.depth = 2, .drop_last = true});
      const std::size_t first_step = sampler.position() / local_batch;
      rd::batch b;
      const auto t_epoch = clock_type::now();
      auto t_window = t_epoch;
      // Summed over ranks at each report: loss sum, correct, samples, wait s, comm s.
      std::array<double, 5> window{0, 0, 0, 0, 0};
      double epoch_wait = 0, epoch_comm = 0;
      std::size_t epoch_samples = 0;
      for (std::size_t s = first_step; batches.next(b); ++s, ++state.step) {
        opt.set_lr(schedule(state.step));
        opt.zero_grad();
        ad::tensor loss;
        std::vector<int> predicted;
        {
          auto span = trainer.span("forward");
          auto x = ad::tensor::from_data(
              b.images.data(),
              {static_cast<ad::index>(b.size()), static_cast<ad::index>(b.images.cols())});
          auto logits = model(x);
          loss = ad::softmax_cross_entropy(logits, std::span<const int>(b.labels));
          predicted = ad::argmax_rows(logits);
        }
        trainer.backward(loss);
        trainer.step(opt);
        sampler.advance(b.size());

        const double l = loss.item();
        if (!std::isfinite(l)) {
          throw ringflow::error(
              fmt::format("rank {}: loss became {} at epoch {} step {}; lower --lr", rank, l,
                          epoch + 1, s + 1));
        }
        window[0] += l;
        for (std::size_t i = 0; i < b.size(); ++i) window[1] += predicted[i] == b.labels[i] ? 1 : 0;
        window[2] += static_cast<double>(b.size());
        window[3] += trainer.last_step().wait_s;
        window[4] += trainer.last_step().comm_s;
        bytes_last_step = trainer.last_step().bytes_sent;
        if ((s + 1) % report_every == 0 || s + 1 == steps_per_epoch) {
          const double wall = seconds_since(t_window);
          const double steps_in_window = window[2] / static_cast<double>(local_batch);
          ringflow::allreduce(comm, std::span<double>(window), ringflow::sum);
          epoch_wait += window[3] / np;
          epoch_comm += window[4] / np;
          epoch_samples += static_cast<std::size_t>(window[2]);
          report.update({epoch + 1, o.epochs, s + 1, steps_per_epoch,
                         window[0] / (steps_in_window * np), window[1] / window[2],
                         window[2] / wall, window[3] / np / wall,
                         window[4] > 0 ? std::max(0.0, 1.0 - window[3] / window[4]) : 0.0});
          window = {0, 0, 0, 0, 0};
          t_window = clock_type::now();
        }
        if (o.checkpoint_every > 0 && state.step % o.checkpoint_every == o.checkpoint_every - 1) {
          ++state.step;  // the step just taken counts
          save();
          --state.step;
        }
      }
      const double epoch_s = seconds_since(t_epoch);
      {
        const auto full = whole();
        test_acc = accuracy(comm, model, fm.test);
      }
      report.line(
          "epoch {}/{} done: test accuracy {:.4f}, {:.1f}s, {:.0f} samples/s, {:.1f}% of "
          "the time waiting on communication ({:.0f}% of it hidden behind backward)",
          epoch + 1, o.epochs, test_acc, epoch_s, static_cast<double>(epoch_samples) / epoch_s,
          100 * epoch_wait / epoch_s,
          epoch_comm > 0 ? std::max(0.0, 100 * (1 - epoch_wait / epoch_comm)) : 0.0);
      save();
    }
  };
  if (dp) {
    run_epochs(*dp);
  } else {
    run_epochs(*sdp);
  }
  if (start_epoch >= o.epochs) {
    const auto full = whole();
    test_acc = accuracy(comm, model, fm.test);
  }
  // The epochs this run trained (--stop-after may end it early).
  const int last_epoch = o.stop_after > 0 ? std::min(o.stop_after, o.epochs) : o.epochs;
  report.line("trained {} epoch(s) in {:.1f}s on {} rank(s)", std::max(0, last_epoch - start_epoch),
              seconds_since(t_train), np);
  {
    // Model-state memory and traffic of rank 0 (docs/training.md, "Sharded data parallel").
    const rt::memory_stats m = dp ? dp->memory(opt) : sdp->memory(opt);
    const double mib = 1.0 / (1024.0 * 1024.0);
    const double psi = static_cast<double>(model.parameters().numel()) * 4;
    const double ring = 2.0 * (np - 1) / np * psi;
    report.line(
        "memory per rank (zero {}): parameters {:.2f} MiB{}, gradients {:.2f} MiB{}, "
        "optimizer state {:.2f} MiB, total {:.2f} MiB; bytes sent per step {} (ring "
        "formula 2(p-1)/p x {} parameter bytes = {:.0f}{})",
        o.zero, static_cast<double>(m.parameter_bytes) * mib,
        sdp && o.zero >= 3 ? fmt::format(" (peak {:.2f} MiB in forward and backward)",
                                         static_cast<double>(sdp->peak_parameter_bytes()) * mib)
                           : std::string(),
        static_cast<double>(m.gradient_bytes) * mib,
        sdp && o.zero >= 2 ? fmt::format(" (peak {:.2f} MiB during backward)",
                                         static_cast<double>(sdp->peak_gradient_bytes()) * mib)
                           : std::string(),
        static_cast<double>(m.optimizer_state_bytes) * mib, static_cast<double>(m.total()) * mib,
        bytes_last_step, model.parameters().numel() * 4, ring,
        // Stage 3 gathers the parameters in the forward and again in the backward
        // (less the buckets the forward kept): up to ZeRO-3's 3(p-1)/p.
        sdp && o.zero >= 3 ? fmt::format("; stage 3 at most 3(p-1)/p x = {:.0f}", 1.5 * ring)
                           : std::string());
  }
  // --zero 3: the model is whole again after training (collective), so it
  // outlives the trainer.
  if (sdp) sdp->unshard();
  if (o.compress != "none") {
    const auto t = dp->compression_traffic();
    std::string chosen;
    if (o.compress == "auto") {
      for (std::size_t k = 0; k < dp->buckets().size(); ++k) {
        chosen += fmt::format("{}{}", k == 0 ? " (buckets: " : ", ", dp->compression_of(k));
      }
      if (!chosen.empty()) chosen += ")";
    }
    report.line(
        "compression {}{}: rank 0 sent {} bytes vs {} for uncompressed fp32 allreduce "
        "({:.2f}x fewer; payload ratio {:.2f}) over {} bucket reductions",
        o.compress, chosen, t.bytes_sent, t.plain_bytes_sent,
        t.bytes_sent > 0
            ? static_cast<double>(t.plain_bytes_sent) / static_cast<double>(t.bytes_sent)
            : 0.0,
        t.ratio(), t.calls);
  }
  if (rank == 0) {
    std::printf("test_accuracy=%.4f\n", test_acc);
    std::fflush(stdout);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  return ringflow::examples::mpi_example_main(argc, argv, "train_fashion_mnist", parse_args,
                                              print_help, train);
}
