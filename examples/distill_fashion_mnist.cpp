// distill_fashion_mnist: knowledge distillation on Fashion-MNIST, data-parallel over MPI ranks.
// Trains a teacher (a small CNN by default, or an MLP; --teachers K averages
// the logits of K of them), computes its logits for the training set once
// (serve::teacher_logits, split over the ranks), then trains the same
// student 784-N-10 from the same initial weights over the same batches twice:
// on the labels alone and on the teacher's softened targets
// (serve::distillation_loss); teacher and students all train with
// train::data_parallel. Prints the test accuracies and saves the students.
//
//   mpirun -np 2 build/bin/distill_fashion_mnist   # CNN teacher 5 epochs, students 30 epochs
//   mpirun -np 2 build/bin/distill_fashion_mnist --epochs 5,30 --alpha 0.5,0.9
//       --temperature 2,4 --student-seeds 3
//
// --batch is the GLOBAL batch (batch/N per rank, as in train_fashion_mnist).
// Rank 0 reports on stderr; stdout gets the table and, last,
// teacher_accuracy=, labels_only_accuracy= and distilled_accuracy= (means
// over the seeds, of the first --epochs and the first alpha x T). The
// defaults (30 student epochs, alpha 0.5, T 2) are the best of the sweep in
// docs/inference.md, confirmed there with another teacher and five new seeds.
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "mpi_example_main.hpp"
#include "tool_flags.hpp"
#include <ringflow/ad/autodiff.hpp>
#include <ringflow/backends/mpi.hpp>
#include <ringflow/coll/collectives.hpp>
#include <ringflow/data/batch.hpp>
#include <ringflow/data/dataset.hpp>
#include <ringflow/data/sampler.hpp>
#include <ringflow/serve/serve.hpp>
#include <ringflow/train/data_parallel.hpp>

namespace ad = ringflow::ad;
namespace rd = ringflow::data;
namespace rt = ringflow::train;
namespace sv = ringflow::serve;
using clock_type = std::chrono::steady_clock;
using ringflow::tool_flags::bad_flag;

namespace {

constexpr int exit_usage = 2;

struct options {
  std::vector<int> epochs = {30};
  int teacher_epochs = 5;
  std::size_t batch = 128;
  double lr = 1e-3;
  double student_lr = 0;  // 0: --lr
  std::uint64_t seed = 42;
  std::string teacher = "cnn";
  std::vector<ad::index> hidden = {256, 128};
  std::vector<ad::index> channels = {16, 32};
  int teachers = 1;
  ad::index student = 64;
  std::vector<double> alphas = {0.5};
  std::vector<double> temperatures = {2.0};
  int student_seeds = 1;
  int threads = 1;
  std::string data_dir;
  std::size_t limit = 0;
  std::string model_dir = "distill-models";
};

void print_help() {
  std::printf(
      "distill_fashion_mnist: train a teacher, then the same small MLP student on the labels\n"
      "alone and distilled from the teacher (same weights, seed and batches), data-parallel\n"
      "over the MPI ranks; reports the test accuracies.\n"
      "\n"
      "Usage: mpirun -np N distill_fashion_mnist [flags]   (--flag value or --flag=value)\n"
      "  --epochs N,M,..      epochs of each student; a list trains every student once per\n"
      "                       count (default 30)\n"
      "  --teacher-epochs N   epochs of each teacher (default 5)\n"
      "  --batch N            GLOBAL mini-batch, a multiple of the rank count (default 128)\n"
      "  --lr X               peak AdamW learning rate of the teachers, warm-up then cosine\n"
      "                       (default 1e-3)\n"
      "  --student-lr X       peak learning rate of the students (default: --lr)\n"
      "  --seed N             teachers' weights and shuffling; students use N+1.. (default 42)\n"
      "  --teacher NAME       cnn: [conv3x3 pad 1, relu, maxpool 2] per --channels, then\n"
      "                       linear 128, relu, linear 10; or mlp (--hidden) (default cnn)\n"
      "  --hidden A,B,..      hidden widths of an mlp teacher (default 256,128)\n"
      "  --channels A,B,..    conv channels of a cnn teacher (default 16,32)\n"
      "  --teachers K         an ensemble: K teachers (seeds N, N+1000, ..), logits averaged\n"
      "                       (default 1)\n"
      "  --student N          hidden width of the student 784-N-10 (default 64)\n"
      "  --alpha A,B,..       weights of the softened targets in the loss, one distilled\n"
      "                       student per alpha x temperature (default 0.5)\n"
      "  --temperature T,..   distillation temperatures (default 2)\n"
      "  --student-seeds K    repeat every student with K seeds (init and shuffling N+1..N+K),\n"
      "                       the same teacher (default 1)\n"
      "  --threads N          threads per rank for the matrix products (default 1)\n"
      "  --data-dir DIR       Fashion-MNIST IDX files (default $RINGFLOW_DATA_DIR or\n"
      "                       /usr/share/datasets/fashion-mnist)\n"
      "  --limit N            only the first N samples of each split (quick runs)\n"
      "  --model-dir DIR      where the first seed's students go as .rfmodel files\n"
      "                       (default distill-models)\n"
      "  --help               this text\n");
}

// A comma-separated list of numbers in [lo, hi] (lo_open: (lo, hi]).
std::vector<double> numbers(const std::string& flag, const std::string& text, double lo, double hi,
                            bool lo_open) {
  std::vector<double> v;
  std::size_t start = 0;
  for (;;) {
    const std::size_t comma = text.find(',', start);
    if (v.size() == 16) throw bad_flag(fmt::format("{} takes at most 16 values", flag));
    v.push_back(ringflow::tool_flags::parse_number(
        flag, text.substr(start, comma == std::string::npos ? comma : comma - start), lo, hi,
        lo_open));
    if (comma == std::string::npos) return v;
    start = comma + 1;
  }
}

std::optional<options> parse_args(int argc, char** argv) {
  options o;
  ringflow::tool_flags::reader flags(argc, argv);
  while (flags.next()) {
    const std::string& arg = flags.flag();
    if (flags.is("--help", "-h")) {
      return std::nullopt;
    } else if (arg == "--epochs") {
      o.epochs.clear();
      for (long long e : flags.integers(1, 1000, 16)) o.epochs.push_back(static_cast<int>(e));
    } else if (arg == "--teacher-epochs") {
      o.teacher_epochs = static_cast<int>(flags.integer(1, 1000));
    } else if (arg == "--batch") {
      o.batch = static_cast<std::size_t>(flags.integer(1, 1 << 16));
    } else if (arg == "--lr") {
      o.lr = flags.number(0, 10, /*lo_open=*/true);
    } else if (arg == "--student-lr") {
      o.student_lr = flags.number(0, 10, /*lo_open=*/true);
    } else if (arg == "--seed") {
      o.seed = static_cast<std::uint64_t>(flags.integer(0, INT64_MAX / 2));
    } else if (arg == "--teacher") {
      o.teacher = flags.value();
      if (o.teacher != "cnn" && o.teacher != "mlp") {
        throw bad_flag(fmt::format("--teacher expects cnn or mlp, got '{}'", o.teacher));
      }
    } else if (arg == "--hidden") {
      o.hidden.clear();
      for (long long h : flags.integers(1, 1 << 14, 16))
        o.hidden.push_back(static_cast<ad::index>(h));
    } else if (arg == "--channels") {
      o.channels.clear();
      for (long long c : flags.integers(1, 1 << 10, 4))
        o.channels.push_back(static_cast<ad::index>(c));
    } else if (arg == "--teachers") {
      o.teachers = static_cast<int>(flags.integer(1, 16));
    } else if (arg == "--student") {
      o.student = static_cast<ad::index>(flags.integer(1, 1 << 14));
    } else if (arg == "--alpha") {
      o.alphas = numbers(arg, flags.value(), 0, 1, false);
    } else if (arg == "--temperature") {
      o.temperatures = numbers(arg, flags.value(), 0, 100, true);
    } else if (arg == "--student-seeds") {
      o.student_seeds = static_cast<int>(flags.integer(1, 100));
    } else if (arg == "--threads") {
      o.threads = static_cast<int>(flags.integer(1, 1024));
    } else if (arg == "--data-dir") {
      o.data_dir = flags.text();
    } else if (arg == "--limit") {
      o.limit = static_cast<std::size_t>(flags.integer(1, INT64_MAX));
    } else if (arg == "--model-dir") {
      o.model_dir = flags.text();
    } else {
      flags.unknown();
    }
  }
  if (o.student_lr == 0) o.student_lr = o.lr;
  return o;
}

double seconds_since(clock_type::time_point t) {
  return std::chrono::duration<double>(clock_type::now() - t).count();
}

// The teacher --teacher names, weights from `seed`.
ad::sequential build_teacher(const options& o, ad::index features, std::uint64_t seed) {
  if (o.teacher == "mlp") {
    std::vector<ad::index> sizes = {features};
    sizes.insert(sizes.end(), o.hidden.begin(), o.hidden.end());
    sizes.push_back(10);
    return ad::sequential(ad::mlp(sizes, ad::activation::relu, seed));
  }
  ad::index side = 28;
  if (features != side * side) {
    throw ringflow::usage_error(
        fmt::format("--teacher cnn: needs 28x28 images; the data has {} features", features));
  }
  ad::sequential net;
  net.add(ad::reshape_layer({1, side, side}));
  ad::index in = 1;
  for (ad::index c : o.channels) {
    net.add(ad::conv2d_layer(in, c, 3, /*stride=*/1, /*padding=*/1, seed++));
    net.add(ad::activation_layer(ad::activation::relu));
    net.add(ad::max_pool2d_layer(2));
    in = c;
    side /= 2;
  }
  net.add(ad::flatten_layer());
  net.add(ad::linear(in * side * side, 128, seed++));
  net.add(ad::activation_layer(ad::activation::relu));
  net.add(ad::linear(128, 10, seed++));
  return net;
}

// Data-parallel training of `net` for `epochs` (AdamW, warm-up then cosine,
// global batch o.batch): every rank takes its share of each global batch from
// an rd::sampler seeded with `shuffle_seed`, data_parallel averages the
// gradients. `loss_of(logits, indices, labels)` is the loss of the local
// batch whose dataset rows are `indices`.
template <class Loss>
void train_data_parallel(const ringflow::communicator& comm, ad::module& net, const rd::dataset& ds,
                         int epochs, double lr, std::size_t global_batch,
                         std::uint64_t shuffle_seed, Loss&& loss_of) {
  const std::size_t local = global_batch / static_cast<std::size_t>(comm.size());
  rt::data_parallel dp(comm, net.parameters());
  ad::adamw opt(net.parameters(), {.lr = lr, .weight_decay = 1e-4});
  rd::sampler sampler(ds.size(), comm.rank(), comm.size(), shuffle_seed);
  const std::size_t steps = rd::batch_count(sampler.per_rank(), local, /*drop_last=*/true);
  const auto total = static_cast<std::int64_t>(steps) * epochs;
  const auto schedule = ad::warmup_cosine(lr, std::min<std::int64_t>(100, total / 10), total);
  rd::batch b;
  std::int64_t step = 0;
  net.train();
  for (int e = 0; e < epochs; ++e) {
    sampler.set_epoch(static_cast<std::uint64_t>(e));
    const auto order = std::span<const std::size_t>(sampler.indices());
    for (std::size_t s = 0; s < steps; ++s, ++step) {
      const auto rows = order.subspan(s * local, local);
      rd::assemble_batch(ds, rows, b);
      opt.set_lr(schedule(step));
      opt.zero_grad();
      const auto x = ad::tensor::from_data(
          b.images.data(), {static_cast<ad::index>(local), static_cast<ad::index>(ds.features())});
      const auto loss = loss_of(net(x), rows, std::span<const int>(b.labels));
      dp.backward(loss);
      dp.step(opt);
      if (!std::isfinite(loss.item())) {
        throw ringflow::error(
            fmt::format("rank {}: loss became {} at epoch {} step {}; lower the "
                        "learning rate",
                        comm.rank(), loss.item(), e + 1, s + 1));
      }
    }
  }
  net.eval();
}

double argmax_accuracy(const std::vector<float>& logits, std::span<const std::int32_t> labels) {
  std::size_t right = 0;
  for (std::size_t i = 0; i < labels.size(); ++i) {
    const auto row = logits.begin() + static_cast<std::ptrdiff_t>(i * 10);
    right += std::max_element(row, row + 10) - row == labels[i] ? 1 : 0;
  }
  return static_cast<double>(right) / static_cast<double>(labels.size());
}

int run(const options& o, const ringflow::communicator& comm) {
  const int rank = comm.rank(), np = comm.size();
  if (o.batch % static_cast<std::size_t>(np) != 0) {
    if (rank == 0) {
      std::fprintf(stderr,
                   "distill_fashion_mnist: --batch %zu (global) is not a multiple of the %d "
                   "ranks; pick a multiple, e.g. %zu\n",
                   o.batch, np,
                   (o.batch / static_cast<std::size_t>(np) + 1) * static_cast<std::size_t>(np));
    }
    return exit_usage;
  }
  ad::set_threads(o.threads);
  auto fm = rd::load_fashion_mnist(
      o.data_dir.empty() ? rd::default_fashion_mnist_dir() : std::filesystem::path(o.data_dir),
      o.limit);
  rd::normalize(fm.train, rd::fashion_mnist_normalization);
  rd::normalize(fm.test, rd::fashion_mnist_normalization);
  if (fm.train.size() < o.batch) {
    throw ringflow::usage_error(
        fmt::format("--batch {} is larger than the {} training samples", o.batch, fm.train.size()));
  }
  const auto features = static_cast<ad::index>(fm.train.features());
  const auto n_train = static_cast<ad::index>(fm.train.size());
  const auto n_test = static_cast<ad::index>(fm.test.size());
  const auto say = [&](const std::string& line) {
    if (rank == 0) std::fprintf(stderr, "%s\n", line.c_str());
  };
  say(fmt::format(
      "distill_fashion_mnist: {} rank(s); {} train / {} test samples; global batch {} "
      "({} per rank); products: {}",
      np, n_train, n_test, o.batch, o.batch / static_cast<std::size_t>(np), ad::gemm_backend()));

  // Teachers: trained data-parallel, then their logits for the training set
  // (and the test set, for their accuracy), averaged over the ensemble.
  std::vector<float> train_targets(static_cast<std::size_t>(n_train * 10), 0.0f);
  std::vector<float> test_logits(static_cast<std::size_t>(n_test * 10), 0.0f);
  std::vector<double> teacher_acc;
  for (int k = 0; k < o.teachers; ++k) {
    const std::uint64_t seed = o.seed + 1000 * static_cast<std::uint64_t>(k);
    ad::sequential teacher = build_teacher(o, features, seed);
    const auto t0 = clock_type::now();
    train_data_parallel(
        comm, teacher, fm.train, o.teacher_epochs, o.lr, o.batch, seed,
        [](const ad::tensor& logits, std::span<const std::size_t>, std::span<const int> labels) {
          return ad::softmax_cross_entropy(logits, labels);
        });
    const double train_s = seconds_since(t0);
    const auto t1 = clock_type::now();
    const auto tl =
        sv::teacher_logits(comm, teacher, fm.train.images.data(), n_train, features, 10);
    const auto te = sv::teacher_logits(comm, teacher, fm.test.images.data(), n_test, features, 10);
    for (std::size_t i = 0; i < tl.size(); ++i) train_targets[i] += tl[i] / o.teachers;
    for (std::size_t i = 0; i < te.size(); ++i) test_logits[i] += te[i] / o.teachers;
    teacher_acc.push_back(argmax_accuracy(te, fm.test.labels));
    say(
        fmt::format("teacher {} ({} seed {}): {} epochs in {:.1f} s, logits of {} + {} samples in "
                    "{:.1f} s; test accuracy {:.4f}, training accuracy {:.4f}",
                    k + 1, o.teacher, seed, o.teacher_epochs, train_s, n_train, n_test,
                    seconds_since(t1), teacher_acc.back(), argmax_accuracy(tl, fm.train.labels)));
  }
  const double ensemble_acc = argmax_accuracy(test_logits, fm.test.labels);
  if (o.teachers > 1)
    say(fmt::format("ensemble of {}: test accuracy {:.4f}", o.teachers, ensemble_acc));

  // Students: the same weights (seed + 1 + s) and batches for every loss.
  struct setting {
    int epochs;
    double alpha;  // < 0: labels only
    double temperature;
  };
  std::vector<setting> settings;
  for (int e : o.epochs) {
    settings.push_back({e, -1.0, 0.0});
    for (double a : o.alphas)
      for (double t : o.temperatures) settings.push_back({e, a, t});
  }
  const auto describe = [](const setting& st) {
    return st.alpha < 0 ? std::string("labels only")
                        : fmt::format("alpha {} T {}", st.alpha, st.temperature);
  };
  const std::vector<ad::index> student_widths = {features, o.student, 10};
  if (rank == 0) std::filesystem::create_directories(o.model_dir);
  // accuracy[s][k]: seed s, setting k.
  std::vector<std::vector<double>> accuracy(static_cast<std::size_t>(o.student_seeds));
  std::vector<float> t_batch;
  for (int s = 0; s < o.student_seeds; ++s) {
    const std::uint64_t seed = o.seed + 1 + static_cast<std::uint64_t>(s);
    for (const auto& st : settings) {
      ad::mlp student(student_widths, ad::activation::relu, seed);
      const auto t0 = clock_type::now();
      train_data_parallel(
          comm, student, fm.train, st.epochs, o.student_lr, o.batch, seed,
          [&](const ad::tensor& logits, std::span<const std::size_t> rows,
              std::span<const int> labels) {
            if (st.alpha < 0) return ad::softmax_cross_entropy(logits, labels);
            t_batch.resize(rows.size() * 10);
            for (std::size_t i = 0; i < rows.size(); ++i) {
              std::copy_n(train_targets.begin() + static_cast<std::ptrdiff_t>(rows[i] * 10), 10,
                          t_batch.begin() + static_cast<std::ptrdiff_t>(i * 10));
            }
            const auto t = ad::tensor::from_data(t_batch.data(), logits.shape());
            return sv::distillation_loss(logits, t, labels, st.temperature, st.alpha);
          });
      const double secs = seconds_since(t0);
      auto m = sv::model::from_sequential(student);
      if (s == 0 && rank == 0) {
        const auto file = std::filesystem::path(o.model_dir) /
                          (st.alpha < 0 ? fmt::format("student_labels_e{}.rfmodel", st.epochs)
                                        : fmt::format("student_distilled_e{}_a{}_t{}.rfmodel",
                                                      st.epochs, st.alpha, st.temperature));
        sv::save_model(file, m);
        m = sv::load_model(file);  // what is reported is what the file gives back
      }
      accuracy[static_cast<std::size_t>(s)].push_back(
          sv::accuracy(m, fm.test.images.data(), fm.test.labels));
      say(
          fmt::format("student seed {}, {} epochs, {}: test accuracy {:.4f}, training accuracy "
                      "{:.4f} ({:.1f} s)",
                      seed, st.epochs, describe(st), accuracy[static_cast<std::size_t>(s)].back(),
                      sv::accuracy(m, fm.train.images.data(), fm.train.labels), secs));
    }
  }

  if (rank == 0) {
    std::string teacher_name = o.teacher == "cnn"
                                   ? fmt::format("cnn {}", fmt::join(o.channels, ","))
                                   : fmt::format("mlp {}", fmt::join(o.hidden, ","));
    std::printf(
        "\n## Distillation: %d rank(s), teacher %s x %d (%d epochs), student %td-%td-10 (lr %g), "
        "%d seed(s)\n\n",
        np, teacher_name.c_str(), o.teachers, o.teacher_epochs, features, o.student, o.student_lr,
        o.student_seeds);
    for (std::size_t k = 0; k < teacher_acc.size(); ++k)
      std::printf("teacher %zu test accuracy %.4f\n", k + 1, teacher_acc[k]);
    if (o.teachers > 1) std::printf("ensemble test accuracy %.4f\n", ensemble_acc);
    std::printf("\n| student epochs | loss | alpha | T |");
    for (int s = 0; s < o.student_seeds; ++s)
      std::printf(" seed %llu |", static_cast<unsigned long long>(o.seed + 1 + s));
    std::printf(" mean | mean - labels only |\n|---|---|---|---|");
    for (int s = 0; s <= o.student_seeds + 1; ++s) std::printf("---|");
    std::printf("\n");
    std::vector<double> means(settings.size(), 0.0);
    for (std::size_t k = 0; k < settings.size(); ++k) {
      for (const auto& seed_acc : accuracy) means[k] += seed_acc[k] / o.student_seeds;
    }
    double labels_mean = 0;
    for (std::size_t k = 0; k < settings.size(); ++k) {
      const auto& st = settings[k];
      if (st.alpha < 0) {
        labels_mean = means[k];
        std::printf("| %d | labels only | - | - |", st.epochs);
      } else {
        std::printf("| %d | distilled | %g | %g |", st.epochs, st.alpha, st.temperature);
      }
      for (const auto& seed_acc : accuracy) std::printf(" %.4f |", seed_acc[k]);
      std::printf(" %.4f | %+.4f |\n", means[k], means[k] - labels_mean);
    }
    std::printf("\nteacher_accuracy=%.4f\nlabels_only_accuracy=%.4f\ndistilled_accuracy=%.4f\n",
                o.teachers > 1 ? ensemble_acc : teacher_acc[0], means[0],
                settings.size() > 1 ? means[1] : 0.0);
    std::fflush(stdout);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  return ringflow::examples::mpi_example_main(argc, argv, "distill_fashion_mnist", parse_args,
                                              print_help, run);
}
