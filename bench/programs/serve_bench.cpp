// serve_bench: batch forward latency and test accuracy of saved model files
// (fp32 and int8 by default), one line each, for scripts/bench_serve_torch.sh
// to interleave with PyTorch's quantize_dynamic on the same weights.
//
//   build/bin/serve_bench --model-dir serve-models --models fp32,int8 --batch 128 --iters 200
#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

#include "tool_flags.hpp"
#include <ringflow/ad/gemm.hpp>
#include <ringflow/data/dataset.hpp>
#include <ringflow/serve/serve.hpp>

namespace rd = ringflow::data;
namespace sv = ringflow::serve;

int main(int argc, char** argv) {
  std::string dir = "serve-models", data_dir, models = "fp32,int8";
  long long batch = 128, iters = 200, threads = 1;
  try {
    ringflow::tool_flags::reader flags(argc, argv);
    while (flags.next()) {
      if (flags.is("--help", "-h")) {
        std::printf(
            "serve_bench [--model-dir DIR] [--models a,b] [--batch N] [--iters N] [--threads N] "
            "[--data-dir DIR]\n"
            "  times N forwards of one batch of test images for each DIR/<name>.rfmodel (median of "
            "5\n"
            "  rounds) and prints model=<name> batch=<b> ms=<per batch> accuracy=<test "
            "accuracy>\n");
        return 0;
      } else if (flags.flag() == "--model-dir") {
        dir = flags.text();
      } else if (flags.flag() == "--models") {
        models = flags.text();
      } else if (flags.flag() == "--data-dir") {
        data_dir = flags.text();
      } else if (flags.flag() == "--batch") {
        batch = flags.integer(1, 10000);
      } else if (flags.flag() == "--iters") {
        iters = flags.integer(1, 1000000);
      } else if (flags.flag() == "--threads") {
        threads = flags.integer(1, 1024);
      } else {
        flags.unknown();
      }
    }
  } catch (const ringflow::tool_flags::bad_flag& e) {
    return ringflow::tool_flags::report("serve_bench", e);
  }
  try {
    ringflow::ad::set_threads(static_cast<int>(threads));
    auto fm = rd::load_fashion_mnist(data_dir.empty() ? rd::default_fashion_mnist_dir()
                                                      : std::filesystem::path(data_dir));
    rd::normalize(fm.test, rd::fashion_mnist_normalization);
    batch = std::min<long long>(batch, static_cast<long long>(fm.test.size()));
    std::vector<std::string> names;
    for (std::size_t start = 0;;) {
      const auto comma = models.find(',', start);
      names.push_back(models.substr(start, comma - start));
      if (comma == std::string::npos) break;
      start = comma + 1;
    }
    for (const auto& name : names) {
      const sv::model m = sv::load_model(std::filesystem::path(dir) / (name + ".rfmodel"));
      std::vector<float> y(static_cast<std::size_t>(batch * m.outputs()));
      for (int w = 0; w < 10; ++w) m.forward(fm.test.images.data(), batch, y.data());
      std::vector<double> ms;
      for (int round = 0; round < 5; ++round) {
        const auto t0 = std::chrono::steady_clock::now();
        for (long long i = 0; i < iters; ++i) m.forward(fm.test.images.data(), batch, y.data());
        ms.push_back(1e3 *
                     std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() /
                     static_cast<double>(iters));
      }
      std::sort(ms.begin(), ms.end());
      std::printf("model=%s batch=%lld ms=%.4f accuracy=%.4f bytes=%llu path=%s\n", name.c_str(),
                  batch, ms[2], sv::accuracy(m, fm.test.images.data(), fm.test.labels),
                  static_cast<unsigned long long>(
                      std::filesystem::file_size(std::filesystem::path(dir) / (name + ".rfmodel"))),
                  m.quantized() ? sv::to_string(m.path()) : "fp32");
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "serve_bench: %s\n", e.what());
    return 1;
  }
  return 0;
}
