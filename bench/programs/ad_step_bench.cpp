// ad_step_bench: training-step throughput of the autodiff (forward, loss,
// backward, AdamW) on one process, the peer of bench/torch/step_bench.py
// (the same model, batch and optimizer in PyTorch); scripts/bench_torch.sh
// runs the two interleaved and prints medians and ratios.
//
//   ad_step_bench [--model mlp|cnn] [--threads 1] [--batch 128] [--steps 300] [--warmup 30]
#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

#include "tool_flags.hpp"
#include <ringflow/ad/autodiff.hpp>

namespace ad = ringflow::ad;

namespace {

const char* usage_text =
    "ad_step_bench: samples/s of one training step (forward, softmax cross-entropy, backward,\n"
    "AdamW) of the autodiff on random data; compare with bench/torch/step_bench.py\n"
    "  --model mlp|cnn       the model: mlp = 784-256-128-10 with ReLU (default); cnn =\n"
    "                        conv3x3(1->16) relu maxpool2, conv3x3(16->32) relu maxpool2,\n"
    "                        linear 1568-128 relu, linear 128-10\n"
    "  --threads N           threads for the matrix products (default 1)\n"
    "  --batch N             samples per step (default 128)\n"
    "  --steps N             timed steps (default 300)\n"
    "  --warmup N            untimed steps first (default 30)\n"
    "Prints one line: model=... threads=... batch=... samples_per_s=... backend=...\n";

}  // namespace

int main(int argc, char** argv) {
  std::string model_name = "mlp";
  int threads = 1, steps = 300, warmup = 30;
  ad::index batch = 128;
  try {
    ringflow::tool_flags::reader flags(argc, argv);
    while (flags.next()) {
      if (flags.is("--model"))
        model_name = flags.text();
      else if (flags.is("--threads"))
        threads = static_cast<int>(flags.integer(1, 256));
      else if (flags.is("--batch"))
        batch = static_cast<ad::index>(flags.integer(1, 65536));
      else if (flags.is("--steps"))
        steps = static_cast<int>(flags.integer(1, 1000000));
      else if (flags.is("--warmup"))
        warmup = static_cast<int>(flags.integer(0, 1000000));
      else if (flags.is("--help", "-h")) {
        std::printf("%s", usage_text);
        return 0;
      } else {
        flags.unknown();
      }
    }
    if (model_name != "mlp" && model_name != "cnn") {
      throw ringflow::tool_flags::bad_flag("--model expects mlp or cnn, got '" + model_name + "'");
    }
  } catch (const ringflow::tool_flags::bad_flag& e) {
    return ringflow::tool_flags::report("ad_step_bench", e);
  }
  ad::set_threads(threads);
  constexpr ad::index features = 784, classes = 10;
  ad::sequential model;
  if (model_name == "mlp") {
    model = ad::mlp({features, 256, 128, classes}, ad::activation::relu, 42);
  } else {  // train_fashion_mnist --model cnn
    model.add(ad::reshape_layer({1, 28, 28}));
    model.add(ad::conv2d_layer(1, 16, 3, 1, 1, 42));
    model.add(ad::activation_layer(ad::activation::relu));
    model.add(ad::max_pool2d_layer(2));
    model.add(ad::conv2d_layer(16, 32, 3, 1, 1, 43));
    model.add(ad::activation_layer(ad::activation::relu));
    model.add(ad::max_pool2d_layer(2));
    model.add(ad::flatten_layer());
    model.add(ad::linear(32 * 7 * 7, 128, 44));
    model.add(ad::activation_layer(ad::activation::relu));
    model.add(ad::linear(128, classes, 45));
  }
  ad::adamw opt(model.parameters(), {.lr = 1e-3f, .weight_decay = 1e-4f});

  // A few random batches, cycled (the data loader is not what is measured).
  constexpr int batches = 8;
  ad::generator rng(7);
  std::vector<std::vector<float>> images(batches);
  std::vector<std::vector<int>> labels(batches);
  for (int b = 0; b < batches; ++b) {
    images[b].resize(static_cast<std::size_t>(batch * features));
    for (float& v : images[b]) v = static_cast<float>(2 * ad::uniform01(rng) - 1);
    labels[b].resize(static_cast<std::size_t>(batch));
    for (int& l : labels[b]) l = static_cast<int>(ad::uniform01(rng) * classes) % classes;
  }
  float last_loss = 0;
  const auto step = [&](int i) {
    const int b = i % batches;
    auto x = ad::tensor::from_data(images[b].data(), {batch, features});
    auto loss = ad::softmax_cross_entropy(model(x), labels[b]);
    model.zero_grad();
    loss.backward();
    opt.step();
    last_loss = loss.item();
  };
  for (int i = 0; i < warmup; ++i) step(i);
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < steps; ++i) step(i);
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf(
      "model=%s threads=%d batch=%td samples_per_s=%.0f step_ms=%.4f loss=%.4f backend=%s\n",
      model_name.c_str(), threads, batch, static_cast<double>(steps * batch) / s, 1e3 * s / steps,
      static_cast<double>(last_loss), ad::gemm_backend().c_str());
  return 0;
}
