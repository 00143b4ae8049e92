// train_fashion_mnist: trains an MLP on Fashion-MNIST in one process and prints its test accuracy.
//
//   build/bin/train_fashion_mnist --epochs 8 --batch 128 --lr 1e-3 --hidden 256,128
//
// Progress goes to stderr; the last line on stdout is test_accuracy=<fraction>.
#include <ringflow/ad/autodiff.hpp>
#include <ringflow/data/batch.hpp>
#include <ringflow/data/dataset.hpp>
#include <ringflow/data/sampler.hpp>

#include <Eigen/Core>
#include <fmt/format.h>

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

namespace ad = ringflow::ad;
namespace rd = ringflow::data;

namespace {

constexpr int exit_usage = 2;

struct options {
  int epochs = 8;
  std::size_t batch = 128;
  double lr = 1e-3;
  std::uint64_t seed = 42;
  std::vector<ad::index> hidden = {256, 128};
  int threads = 1;
  std::string data_dir;
  std::size_t limit = 0;
};

void print_help() {
  std::printf(
      "train_fashion_mnist: train an MLP on Fashion-MNIST (one process) and report test accuracy.\n"
      "\n"
      "Usage: train_fashion_mnist [flags]   (--flag value or --flag=value)\n"
      "  --epochs N       passes over the training set (default 8)\n"
      "  --batch N        mini-batch size (default 128)\n"
      "  --lr X           peak AdamW learning rate, cosine-decayed to 0 (default 1e-3)\n"
      "  --seed N         seed of weights and shuffling (default 42)\n"
      "  --hidden A,B,..  hidden layer widths, comma-separated (default 256,128)\n"
      "  --threads N      Eigen threads (default 1; only effective when built with OpenMP)\n"
      "  --data-dir DIR   folder with the Fashion-MNIST IDX files\n"
      "                   (default $RINGFLOW_DATA_DIR or /usr/share/datasets/fashion-mnist)\n"
      "  --limit N        load only the first N samples of each split (quick runs)\n"
      "  --help           this text\n"
      "\n"
      "Progress lines go to stderr; the last line on stdout is test_accuracy=<fraction>.\n");
}

// Thrown for a bad command line: main prints it and exits with status 2.
struct bad_flag : std::exception {
  explicit bad_flag(std::string m) : message(std::move(m)) {}
  const char* what() const noexcept override { return message.c_str(); }
  std::string message;
};

long long parse_int(std::string_view flag, const std::string& text, long long min, long long max) {
  std::size_t used = 0;
  long long v = 0;
  try {
    v = std::stoll(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used == 0 || used != text.size() || v < min || v > max) {
    throw bad_flag(fmt::format("{} expects an integer in [{}, {}], got '{}'", flag, min, max, text));
  }
  return v;
}

double parse_double(std::string_view flag, const std::string& text) {
  std::size_t used = 0;
  double v = 0;
  try {
    v = std::stod(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used == 0 || used != text.size() || !(v > 0) || !std::isfinite(v)) {
    throw bad_flag(fmt::format("{} expects a positive number, got '{}'", flag, text));
  }
  return v;
}

std::vector<ad::index> parse_hidden(const std::string& text) {
  std::vector<ad::index> sizes;
  std::size_t start = 0;
  while (start <= text.size()) {
    const std::size_t comma = text.find(',', start);
    const std::string part =
        text.substr(start, comma == std::string::npos ? std::string::npos : comma - start);
    sizes.push_back(static_cast<ad::index>(parse_int("--hidden", part, 1, 1 << 16)));
    if (comma == std::string::npos) break;
    start = comma + 1;
  }
  return sizes;
}

// Returns nullopt when --help was printed.
std::optional<options> parse_args(int argc, char** argv) {
  options o;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "--help" || arg == "-h") {
      print_help();
      return std::nullopt;
    }
    std::string value;
    bool have_value = false;
    if (const auto eq = arg.find('='); arg.rfind("--", 0) == 0 && eq != std::string::npos) {
      value = arg.substr(eq + 1);
      arg = arg.substr(0, eq);
      have_value = true;
    }
    const auto take = [&]() -> std::string {
      if (have_value) return value;
      if (i + 1 >= argc) throw bad_flag(fmt::format("{} needs a value", arg));
      return argv[++i];
    };
    if (arg == "--epochs") {
      o.epochs = static_cast<int>(parse_int(arg, take(), 1, 100000));
    } else if (arg == "--batch") {
      o.batch = static_cast<std::size_t>(parse_int(arg, take(), 1, 1 << 20));
    } else if (arg == "--lr") {
      o.lr = parse_double(arg, take());
    } else if (arg == "--seed") {
      o.seed = static_cast<std::uint64_t>(parse_int(arg, take(), 0, INT64_MAX));
    } else if (arg == "--hidden") {
      o.hidden = parse_hidden(take());
    } else if (arg == "--threads") {
      o.threads = static_cast<int>(parse_int(arg, take(), 1, 1024));
    } else if (arg == "--data-dir") {
      o.data_dir = take();
      if (o.data_dir.empty()) throw bad_flag("--data-dir needs a non-empty folder");
    } else if (arg == "--limit") {
      o.limit = static_cast<std::size_t>(parse_int(arg, take(), 1, INT64_MAX));
    } else {
      throw bad_flag(fmt::format("unknown argument '{}'", argv[i]));
    }
  }
  return o;
}

using clock_type = std::chrono::steady_clock;
double seconds_since(clock_type::time_point t) {
  return std::chrono::duration<double>(clock_type::now() - t).count();
}

// Fraction of `ds` the model classifies correctly, in slices viewed without copying.
double accuracy(ad::mlp& model, const rd::dataset& ds) {
  ad::no_grad guard;
  model.eval();
  const std::size_t slice = 1000;
  std::size_t correct = 0;
  for (std::size_t begin = 0; begin < ds.size(); begin += slice) {
    const std::size_t n = std::min(slice, ds.size() - begin);
    auto x = ad::tensor::from_data(ds.sample(begin), {static_cast<ad::index>(n),
                                                       static_cast<ad::index>(ds.features())});
    const auto predicted = ad::argmax_rows(model(x));
    for (std::size_t i = 0; i < n; ++i) correct += predicted[i] == ds.labels[begin + i] ? 1 : 0;
  }
  model.train();
  return static_cast<double>(correct) / static_cast<double>(ds.size());
}

int train(const options& o) {
  Eigen::setNbThreads(o.threads);
  const auto t_load = clock_type::now();
  auto fm = rd::load_fashion_mnist(
      o.data_dir.empty() ? rd::default_fashion_mnist_dir() : std::filesystem::path(o.data_dir),
      o.limit);
  rd::normalize(fm.train, rd::fashion_mnist_normalization);
  rd::normalize(fm.test, rd::fashion_mnist_normalization);
  if (fm.train.size() < o.batch) {
    throw ringflow::usage_error(fmt::format("--batch {} is larger than the {} training samples",
                                            o.batch, fm.train.size()));
  }

  std::vector<ad::index> sizes = {static_cast<ad::index>(fm.train.features())};
  sizes.insert(sizes.end(), o.hidden.begin(), o.hidden.end());
  sizes.push_back(fm.train.num_classes);
  ad::mlp model(sizes, ad::activation::relu, o.seed);
  ad::adamw opt(model.parameters(), {.lr = o.lr, .weight_decay = 1e-4});

  // One process: rank 0 of 1. Under MPI pass comm.rank(), comm.size().
  rd::sampler sampler(fm.train.size(), 0, 1, o.seed);
  const std::size_t steps_per_epoch = rd::batch_count(sampler.per_rank(), o.batch, true);
  const auto total_steps = static_cast<std::int64_t>(steps_per_epoch) * o.epochs;
  const auto schedule = ad::warmup_cosine(o.lr, std::min<std::int64_t>(100, total_steps / 10),
                                          total_steps);

  std::string layout = fmt::format("{}", sizes[0]);
  for (std::size_t i = 1; i < sizes.size(); ++i) layout += fmt::format("-{}", sizes[i]);
  fmt::print(stderr,
             "train_fashion_mnist: {} train / {} test samples loaded in {:.2f}s; mlp {} ({} "
             "parameters), batch {}, {} steps/epoch, AdamW lr {} cosine, Eigen threads {}\n",
             fm.train.size(), fm.test.size(), seconds_since(t_load), layout,
             model.parameters().numel(), o.batch, steps_per_epoch, o.lr, Eigen::nbThreads());

  const auto t_train = clock_type::now();
  std::int64_t step = 0;
  double test_acc = 0.0;
  for (int epoch = 0; epoch < o.epochs; ++epoch) {
    sampler.set_epoch(static_cast<std::uint64_t>(epoch));
    // drop_last: every step sees a full batch (the few left-over samples are
    // in a different place of next epoch's shuffle).
    rd::prefetcher batches(fm.train, sampler.remaining(), o.batch, {.depth = 2, .drop_last = true});
    rd::batch b;
    const auto t_epoch = clock_type::now();
    auto t_window = t_epoch;
    double loss_window = 0.0, loss_epoch = 0.0;
    std::size_t n_window = 0, samples_window = 0;
    const std::size_t report_every = std::max<std::size_t>(1, steps_per_epoch / 4);
    for (std::size_t s = 0; batches.next(b); ++s, ++step) {
      opt.set_lr(schedule(step));
      auto x = ad::tensor::from_data(b.images.data(), {static_cast<ad::index>(b.size()),
                                                       static_cast<ad::index>(b.images.cols())});
      auto loss = ad::softmax_cross_entropy(model(x), std::span<const int>(b.labels));
      opt.zero_grad();
      loss.backward();
      opt.step();
      sampler.advance(b.size());

      const double l = loss.item();
      if (!std::isfinite(l)) {
        throw ringflow::error(fmt::format("loss became {} at epoch {} step {}; lower --lr", l,
                                          epoch + 1, s + 1));
      }
      loss_window += l;
      loss_epoch += l;
      ++n_window;
      samples_window += b.size();
      if ((s + 1) % report_every == 0 || s + 1 == steps_per_epoch) {
        fmt::print(stderr, "epoch {}/{} step {}/{} loss {:.4f} lr {:.2e} samples/s {:.0f}\n",
                   epoch + 1, o.epochs, s + 1, steps_per_epoch, loss_window / n_window,
                   opt.lr(), samples_window / seconds_since(t_window));
        loss_window = 0.0;
        n_window = samples_window = 0;
        t_window = clock_type::now();
      }
    }
    const double epoch_s = seconds_since(t_epoch);
    test_acc = accuracy(model, fm.test);
    fmt::print(stderr,
               "epoch {}/{} done: train loss {:.4f}, test accuracy {:.4f}, {:.1f}s ({:.0f} "
               "samples/s)\n",
               epoch + 1, o.epochs, loss_epoch / static_cast<double>(steps_per_epoch), test_acc,
               epoch_s, static_cast<double>(steps_per_epoch * o.batch) / epoch_s);
  }
  fmt::print(stderr, "trained {} epochs in {:.1f}s\n", o.epochs, seconds_since(t_train));
  std::printf("test_accuracy=%.4f\n", test_acc);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  std::optional<options> o;
  try {
    o = parse_args(argc, argv);
  } catch (const bad_flag& e) {
    std::fprintf(stderr, "train_fashion_mnist: %s; see --help\n", e.what());
    return exit_usage;
  }
  if (!o) return 0;
  try {
    return train(*o);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "train_fashion_mnist: %s\n", e.what());
    return 1;
  }
}
