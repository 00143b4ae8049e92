// serve_fashion_mnist: from a trained Fashion-MNIST MLP to fast inference.
// Trains (or loads) the fp32 MLP, quantizes it to int8, prunes it (80%
// unstructured, half the hidden neurons structured), distills a small
// student, saves every model file, and prints accuracy / size / latency,
// int8 against fp32 products, and the batched runner under load.
//
//   build/bin/serve_fashion_mnist --epochs 5 --model-dir serve-models
//   build/bin/serve_fashion_mnist --load --model-dir serve-models   # skip the teacher's training
//
// One process, one thread for the products (--threads); docs/inference.md
// has the tables this prints and how they were measured.
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <memory>
#include <numeric>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "tool_flags.hpp"
#include <ringflow/ad/autodiff.hpp>
#include <ringflow/ad/gemm.hpp>
#include <ringflow/data/dataset.hpp>
#include <ringflow/serve/serve.hpp>

namespace ad = ringflow::ad;
namespace rd = ringflow::data;
namespace sv = ringflow::serve;
using clock_type = std::chrono::steady_clock;

namespace {

struct options {
  int epochs = 5;
  std::size_t batch = 128;
  double lr = 1e-3;
  std::uint64_t seed = 42;
  std::vector<ad::index> hidden = {256, 128};
  std::string data_dir;
  std::size_t limit = 0;
  std::string model_dir = "serve-models";
  bool load = false;
  ad::index calib = 2048;
  double sparsity = 0.8;
  double keep = 0.5;
  int finetune_epochs = 1;
  ad::index student = 64;
  double temperature = 4.0;
  double alpha = 0.9;
  int reps = 15;
  int serve_ms = 1500;
  int clients = 8;
  int in_flight = 32;
  int max_wait_us = 1000;
  int threads = 1;
  bool skip_serve = false;
};

void print_help() {
  std::printf(
      "serve_fashion_mnist: train (or load) the Fashion-MNIST MLP, quantize, prune, distill,\n"
      "save the model files, and measure accuracy, size, latency and batched serving.\n"
      "\n"
      "Usage: serve_fashion_mnist [flags]   (--flag value or --flag=value)\n"
      "  --epochs N           epochs of the fp32 teacher and of each student (default 5)\n"
      "  --batch N            training mini-batch (default 128)\n"
      "  --lr X               peak AdamW learning rate, warm-up then cosine (default 1e-3)\n"
      "  --seed N             weights and shuffling (default 42)\n"
      "  --hidden A,B,..      hidden widths of the teacher (default 256,128)\n"
      "  --data-dir DIR       Fashion-MNIST IDX files (default $RINGFLOW_DATA_DIR or\n"
      "                       /usr/share/datasets/fashion-mnist)\n"
      "  --limit N            only the first N samples of each split (quick runs)\n"
      "  --model-dir DIR      where the .rfmodel files go (default serve-models)\n"
      "  --load               load DIR/fp32.rfmodel instead of training the teacher\n"
      "  --calib N            calibration samples from the training set (default 2048)\n"
      "  --sparsity X         unstructured global magnitude pruning (default 0.8)\n"
      "  --keep X             share of hidden neurons structured pruning keeps (default 0.5)\n"
      "  --finetune-epochs N  fine-tuning after pruning (default 1)\n"
      "  --student N          hidden width of the distilled student 784-N-10 (default 64)\n"
      "  --temperature X      distillation temperature (default 4)\n"
      "  --alpha X            weight of the softened targets in the student's loss (default 0.9)\n"
      "  --reps N             timing repetitions, interleaved over the models (default 15)\n"
      "  --serve-ms N         load-generator run per max batch and model (default 1500)\n"
      "  --clients N          load-generator client threads (default 8)\n"
      "  --in-flight N        requests each client keeps outstanding (default 32)\n"
      "  --max-wait-us N      the runner's batching deadline (default 1000)\n"
      "  --threads N          threads of the fp32 products (default 1)\n"
      "  --skip-serve         leave out the batched-runner table\n"
      "  --help               this text\n");
}

using ringflow::tool_flags::bad_flag;

std::optional<options> parse_args(int argc, char** argv) {
  options o;
  ringflow::tool_flags::reader flags(argc, argv);
  while (flags.next()) {
    const std::string& arg = flags.flag();
    if (flags.is("--help", "-h")) {
      return std::nullopt;
    } else if (arg == "--epochs") {
      o.epochs = static_cast<int>(flags.integer(1, 1000));
    } else if (arg == "--batch") {
      o.batch = static_cast<std::size_t>(flags.integer(1, 1 << 16));
    } else if (arg == "--lr") {
      o.lr = flags.number(0, 10, /*lo_open=*/true);
    } else if (arg == "--seed") {
      o.seed = static_cast<std::uint64_t>(flags.integer(0, INT64_MAX));
    } else if (arg == "--hidden") {
      o.hidden.clear();
      for (long long h : flags.integers(1, 1 << 14, 16))
        o.hidden.push_back(static_cast<ad::index>(h));
    } else if (arg == "--data-dir") {
      o.data_dir = flags.text();
    } else if (arg == "--limit") {
      o.limit = static_cast<std::size_t>(flags.integer(1, INT64_MAX));
    } else if (arg == "--model-dir") {
      o.model_dir = flags.text();
    } else if (arg == "--load") {
      flags.no_value();
      o.load = true;
    } else if (arg == "--calib") {
      o.calib = static_cast<ad::index>(flags.integer(1, 1 << 20));
    } else if (arg == "--sparsity") {
      o.sparsity = flags.number(0, 0.99);
    } else if (arg == "--keep") {
      o.keep = flags.number(0, 1, /*lo_open=*/true);
    } else if (arg == "--finetune-epochs") {
      o.finetune_epochs = static_cast<int>(flags.integer(0, 1000));
    } else if (arg == "--student") {
      o.student = static_cast<ad::index>(flags.integer(1, 1 << 14));
    } else if (arg == "--temperature") {
      o.temperature = flags.number(0, 100, /*lo_open=*/true);
    } else if (arg == "--alpha") {
      o.alpha = flags.number(0, 1);
    } else if (arg == "--reps") {
      o.reps = static_cast<int>(flags.integer(1, 10000));
    } else if (arg == "--serve-ms") {
      o.serve_ms = static_cast<int>(flags.integer(10, 600000));
    } else if (arg == "--clients") {
      o.clients = static_cast<int>(flags.integer(1, 1024));
    } else if (arg == "--in-flight") {
      o.in_flight = static_cast<int>(flags.integer(1, 1 << 16));
    } else if (arg == "--max-wait-us") {
      o.max_wait_us = static_cast<int>(flags.integer(0, 10000000));
    } else if (arg == "--threads") {
      o.threads = static_cast<int>(flags.integer(1, 1024));
    } else if (arg == "--skip-serve") {
      flags.no_value();
      o.skip_serve = true;
    } else {
      flags.unknown();
    }
  }
  return o;
}

double seconds_since(clock_type::time_point t) {
  return std::chrono::duration<double>(clock_type::now() - t).count();
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : v[v.size() / 2];
}

// One epoch-style training loop over shuffled mini-batches. `loss_of`
// builds the loss of a batch (x, first row index list); `after_step` runs
// after each optimizer step (pruning masks).
template <class Loss, class After>
void train(ad::sequential& net, const rd::dataset& ds, int epochs, const options& o, double lr,
           Loss&& loss_of, After&& after_step) {
  auto params = net.parameters();
  ad::adamw opt(params, {.lr = lr});
  const std::size_t steps_per_epoch = ds.size() / o.batch;
  const auto total = static_cast<std::int64_t>(steps_per_epoch) * epochs;
  auto sched = ad::warmup_cosine(lr, std::min<std::int64_t>(200, total / 10), total);
  std::mt19937_64 rng(o.seed);
  std::vector<std::size_t> order(ds.size());
  std::iota(order.begin(), order.end(), 0);
  std::vector<float> x(o.batch * ds.features());
  std::vector<int> labels(o.batch);
  std::int64_t step = 0;
  net.train();
  for (int e = 0; e < epochs; ++e) {
    std::shuffle(order.begin(), order.end(), rng);
    for (std::size_t s = 0; s < steps_per_epoch; ++s, ++step) {
      for (std::size_t i = 0; i < o.batch; ++i) {
        const std::size_t r = order[s * o.batch + i];
        std::copy_n(ds.sample(r), ds.features(),
                    x.begin() + static_cast<std::ptrdiff_t>(i * ds.features()));
        labels[i] = ds.labels[r];
      }
      auto xt = ad::tensor::from_data(
          x.data(), {static_cast<ad::index>(o.batch), static_cast<ad::index>(ds.features())});
      auto loss = loss_of(xt, labels);
      net.zero_grad();
      loss.backward();
      opt.set_lr(sched(step));
      opt.step();
      after_step();
    }
  }
  net.eval();
}

void train_on_labels(
    ad::sequential& net, const rd::dataset& ds, int epochs, const options& o, double lr,
    const std::function<void()>& after = [] {}) {
  train(
      net, ds, epochs, o, lr,
      [&](const ad::tensor& x, const std::vector<int>& labels) {
        return ad::softmax_cross_entropy(net(x), labels);
      },
      after);
}

std::vector<ad::index> widths(ad::index in, const std::vector<ad::index>& hidden, ad::index out) {
  std::vector<ad::index> w{in};
  w.insert(w.end(), hidden.begin(), hidden.end());
  w.push_back(out);
  return w;
}

struct row {
  std::string name;
  std::shared_ptr<const sv::model> model;
  std::string file;
  double accuracy = 0;
  std::size_t bytes = 0;
  std::vector<double> ms{};  // batch-128 forward, per rep
};

int run(const options& o) {
  ad::set_threads(o.threads);
  const auto dir =
      o.data_dir.empty() ? rd::default_fashion_mnist_dir() : std::filesystem::path(o.data_dir);
  auto fm = rd::load_fashion_mnist(dir, o.limit);
  rd::normalize(fm.train, rd::fashion_mnist_normalization);
  rd::normalize(fm.test, rd::fashion_mnist_normalization);
  const auto features = static_cast<ad::index>(fm.train.features());
  std::filesystem::create_directories(o.model_dir);
  const std::filesystem::path mdir(o.model_dir);
  std::fprintf(stderr, "products: %s; int8 path: %s; %zu training, %zu test samples\n",
               ad::gemm_backend().c_str(), sv::to_string(sv::best_int8_path()), fm.train.size(),
               fm.test.size());

  const auto teacher_widths = widths(features, o.hidden, 10);
  ad::mlp teacher(teacher_widths, ad::activation::relu, o.seed);
  if (o.load) {
    sv::load_model(mdir / "fp32.rfmodel").copy_to(teacher);
  } else {
    const auto t0 = clock_type::now();
    train_on_labels(teacher, fm.train, o.epochs, o, o.lr);
    std::fprintf(stderr, "teacher trained: %d epochs in %.1f s\n", o.epochs, seconds_since(t0));
  }
  teacher.eval();
  auto fp32 = std::make_shared<const sv::model>(sv::model::from_sequential(teacher));

  const ad::index calib = std::min<ad::index>(o.calib, static_cast<ad::index>(fm.train.size()));
  auto int8 = std::make_shared<const sv::model>(sv::quantize(*fp32, fm.train.images.data(), calib));
  auto int8_pct = std::make_shared<const sv::model>(
      sv::quantize(*fp32, fm.train.images.data(), calib,
                   {.how = sv::calibration_options::method::percentile, .percentile = 99.99}));

  // Unstructured: global magnitude pruning, then fine-tuning with the mask.
  ad::mlp pruned_net(teacher_widths, ad::activation::relu, o.seed);
  fp32->copy_to(pruned_net);
  auto pruned_params = pruned_net.parameters();
  const auto mask = sv::prune_global_magnitude(pruned_params, o.sparsity);
  const double acc_pruned_raw =
      sv::accuracy(sv::model::from_sequential(pruned_net), fm.test.images.data(), fm.test.labels);
  train_on_labels(pruned_net, fm.train, o.finetune_epochs, o, o.lr * 0.3,
                  [&] { mask.apply(pruned_params); });
  auto pruned = std::make_shared<const sv::model>(sv::model::from_sequential(pruned_net));
  auto pruned_int8 =
      std::make_shared<const sv::model>(sv::quantize(*pruned, fm.train.images.data(), calib));

  // Structured: drop the least important hidden neurons, fine-tune the smaller net.
  const sv::model shrunk = sv::prune_neurons(*fp32, o.keep);
  const auto shrunk_widths = shrunk.widths();
  ad::mlp shrunk_net(shrunk_widths, ad::activation::relu, o.seed);
  shrunk.copy_to(shrunk_net);
  const double acc_shrunk_raw = sv::accuracy(shrunk, fm.test.images.data(), fm.test.labels);
  train_on_labels(shrunk_net, fm.train, o.finetune_epochs, o, o.lr * 0.3);
  auto structured = std::make_shared<const sv::model>(sv::model::from_sequential(shrunk_net));

  // Distillation: the same student trained on labels alone and on the teacher.
  const auto student_widths = widths(features, {o.student}, 10);
  ad::mlp student_labels(student_widths, ad::activation::relu, o.seed + 1);
  train_on_labels(student_labels, fm.train, o.epochs, o, o.lr);
  ad::mlp student_kd(student_widths, ad::activation::relu, o.seed + 1);
  {
    std::vector<float> tl;
    train(
        student_kd, fm.train, o.epochs, o, o.lr,
        [&](const ad::tensor& x, const std::vector<int>& labels) {
          tl.resize(static_cast<std::size_t>(x.rows() * 10));
          fp32->forward(x.data().data(), x.rows(), tl.data());
          const auto t = ad::tensor::from_data(tl.data(), {x.rows(), 10});
          return sv::distillation_loss(student_kd(x), t, labels, o.temperature, o.alpha);
        },
        [] {});
  }
  auto student_l = std::make_shared<const sv::model>(sv::model::from_sequential(student_labels));
  auto student_d = std::make_shared<const sv::model>(sv::model::from_sequential(student_kd));
  auto student_d8 =
      std::make_shared<const sv::model>(sv::quantize(*student_d, fm.train.images.data(), calib));

  std::vector<row> rows = {
      {"fp32", fp32, "fp32.rfmodel"},
      {"int8 (min/max calibration)", int8, "int8.rfmodel"},
      {"int8 (99.99th percentile)", int8_pct, "int8_percentile.rfmodel"},
      {fmt::format("pruned {:.0f}% unstructured, fp32", 100 * o.sparsity), pruned,
       "pruned.rfmodel"},
      {fmt::format("pruned {:.0f}% unstructured, int8", 100 * o.sparsity), pruned_int8,
       "pruned_int8.rfmodel"},
      {fmt::format("structured {}", fmt::join(shrunk_widths, "-")), structured,
       "structured.rfmodel"},
      {fmt::format("student {} (labels only)", fmt::join(student_widths, "-")), student_l,
       "student_labels.rfmodel"},
      {fmt::format("student {} (distilled)", fmt::join(student_widths, "-")), student_d,
       "student_distilled.rfmodel"},
      {fmt::format("student {} (distilled, int8)", fmt::join(student_widths, "-")), student_d8,
       "student_distilled_int8.rfmodel"},
  };
  for (auto& r : rows) {
    const auto file = mdir / r.file;
    sv::save_model(file, *r.model);
    // What the table reports is what the file gives back.
    r.model = std::make_shared<const sv::model>(sv::load_model(file));
    r.bytes = std::filesystem::file_size(file);
    r.accuracy = sv::accuracy(*r.model, fm.test.images.data(), fm.test.labels);
  }

  // Latency of one batch of 128, one thread: every model in turn, rep by rep,
  // plus the ad model's own forward (autodiff, no_grad) as the fp32 peer.
  const ad::index b = std::min<ad::index>(128, static_cast<ad::index>(fm.test.size()));
  std::vector<float> y(static_cast<std::size_t>(b * 10));
  std::vector<double> ad_ms;
  const int inner = 20;
  for (int rep = 0; rep < o.reps; ++rep) {
    {
      ad::no_grad guard;
      const auto x = ad::tensor::from_data(fm.test.images.data(), {b, features});
      const auto t0 = clock_type::now();
      for (int k = 0; k < inner; ++k) (void)teacher(x);
      ad_ms.push_back(1e3 * seconds_since(t0) / inner);
    }
    for (auto& r : rows) {
      const auto t0 = clock_type::now();
      for (int k = 0; k < inner; ++k) r.model->forward(fm.test.images.data(), b, y.data());
      r.ms.push_back(1e3 * seconds_since(t0) / inner);
    }
  }
  const double fp32_ms = median(rows[0].ms);
  std::printf(
      "\n## Models (test accuracy on %zu samples, batch-%td forward on 1 thread, median of %d "
      "reps)\n\n",
      fm.test.size(), b, o.reps);
  std::printf(
      "| model | test accuracy | nonzero weights | file bytes | size vs fp32 | batch-%td ms | "
      "speedup vs fp32 |\n",
      b);
  std::printf("|---|---|---|---|---|---|---|\n");
  std::printf("| fp32, ad forward (autodiff, no_grad) | %.4f | %zu | - | - | %.3f | %.2fx |\n",
              rows[0].accuracy, fp32->nonzero_weights(), median(ad_ms), fp32_ms / median(ad_ms));
  for (const auto& r : rows) {
    std::printf("| %s | %.4f | %zu | %zu | %.2fx smaller | %.3f | %.2fx |\n", r.name.c_str(),
                r.accuracy, r.model->nonzero_weights(), r.bytes,
                static_cast<double>(rows[0].bytes) / static_cast<double>(r.bytes), median(r.ms),
                fp32_ms / median(r.ms));
  }
  std::printf(
      "\nbefore fine-tuning: pruned %.0f%% %.4f, structured %.4f (1 fine-tuning epoch each: %d)\n",
      100 * o.sparsity, acc_pruned_raw, acc_shrunk_raw, o.finetune_epochs);
  std::printf("int8 path %s, fp32 products %s\n", sv::to_string(sv::best_int8_path()),
              ad::gemm_backend().c_str());

  // Products alone: int8 (every path) against fp32 ad::gemm, the MLP's shapes.
  std::printf(
      "\n## int8 against fp32 products (m x k x n, median of %d reps, GOP/s = 2mkn / time)\n\n",
      o.reps);
  std::printf(
      "| m x k x n | fp32 ad::gemm us | int8 path | int8 us | int8 GOP/s | speedup "
      "|\n|---|---|---|---|---|---|\n");
  const ad::index shapes[][3] = {{128, 784, 256}, {128, 256, 128}, {128, 128, 10}, {1, 784, 256}};
  std::mt19937 rng(1);
  for (const auto& s : shapes) {
    const ad::index m = s[0], k = s[1], n = s[2];
    std::vector<float> af(static_cast<std::size_t>(m * k)), bf(static_cast<std::size_t>(k * n)),
        cf(static_cast<std::size_t>(m * n));
    std::vector<std::uint8_t> a8(af.size());
    std::vector<std::int8_t> b8(bf.size());
    std::vector<std::int32_t> c32(cf.size());
    for (auto& v : af) v = static_cast<float>(rng() % 200) / 100.0f;
    for (auto& v : bf) v = static_cast<float>(static_cast<int>(rng() % 200) - 100) / 100.0f;
    for (auto& v : a8) v = static_cast<std::uint8_t>(rng());
    for (auto& v : b8) v = static_cast<std::int8_t>(rng());
    const int iters = m == 1 ? 2000 : 100;
    for (const auto path : sv::supported_int8_paths()) {
      const sv::packed_int8_matrix w(b8.data(), k, n, n, path);
      std::vector<double> tf, ti;
      for (int rep = 0; rep < o.reps; ++rep) {
        auto t0 = clock_type::now();
        for (int i = 0; i < iters; ++i) {
          ad::gemm<float>(false, false, m, n, k, 1.0f, af.data(), k, bf.data(), n, 0.0f, cf.data(),
                          n);
        }
        tf.push_back(1e6 * seconds_since(t0) / iters);
        t0 = clock_type::now();
        for (int i = 0; i < iters; ++i) sv::gemm_u8s8s32(m, a8.data(), k, 128, w, c32.data(), n);
        ti.push_back(1e6 * seconds_since(t0) / iters);
      }
      const double f = median(tf), q = median(ti);
      std::printf("| %td x %td x %td | %.2f | %s | %.2f | %.1f | %.2fx |\n", m, k, n, f,
                  sv::to_string(path), q, 2.0 * static_cast<double>(m * k * n) / (q * 1e3), f / q);
    }
  }

  if (!o.skip_serve) {
    std::printf(
        "\n## Batched runner (%d clients x %d in flight, closed loop, max wait %d us, %d ms per "
        "row)\n\n",
        o.clients, o.in_flight, o.max_wait_us, o.serve_ms);
    std::printf(
        "| model | max batch | requests/s | p50 us | p99 us | mean batch | rejected "
        "|\n|---|---|---|---|---|---|---|\n");
    for (const std::size_t mb : {1, 8, 32, 128}) {
      for (const auto& r : {rows[0], rows[1]}) {
        sv::runner runner(r.model, {.max_batch = mb,
                                    .max_wait = std::chrono::microseconds(o.max_wait_us),
                                    .max_queue = 4096});
        const auto rep =
            sv::run_load(runner, fm.test.images.data(), static_cast<ad::index>(fm.test.size()),
                         {.clients = o.clients,
                          .in_flight = o.in_flight,
                          .duration = std::chrono::milliseconds(o.serve_ms)});
        std::printf("| %s | %zu | %.0f | %.0f | %.0f | %.1f | %llu |\n", r.name.c_str(), mb,
                    rep.throughput, rep.p50_us, rep.p99_us, rep.mean_batch,
                    static_cast<unsigned long long>(rep.rejected));
        std::fflush(stdout);
      }
    }
  }
  std::printf("\nmodel files in %s\n", o.model_dir.c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  std::optional<options> o;
  try {
    o = parse_args(argc, argv);
  } catch (const bad_flag& e) {
    return ringflow::tool_flags::report("serve_fashion_mnist", e);
  }
  if (!o) {
    print_help();
    return 0;
  }
  try {
    return run(*o);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "\nserve_fashion_mnist: %s\n", e.what());
    return 1;
  }
}
