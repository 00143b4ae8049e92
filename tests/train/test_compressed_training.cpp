// data_parallel with gradient compression: identical parameters on every rank, fewer bytes, fp16
// close to fp32.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "ringflow/ad/autodiff.hpp"
#include "ringflow/backends/local.hpp"
#include "ringflow/coll/collectives.hpp"
#include "ringflow/core/error.hpp"
#include "ringflow/train/data_parallel.hpp"
#include "support/catch.hpp"

using namespace ringflow;

namespace {

// Deterministic pseudo-random floats in [-1, 1).
std::vector<float> uniform_noise(std::size_t n, std::uint64_t seed) {
  std::vector<float> v(n);
  std::uint64_t x = seed * 0x9e3779b97f4a7c15ull + 1;
  for (auto& f : v) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    f = static_cast<float>(static_cast<double>(x >> 11) / 9007199254740992.0 * 2.0 - 1.0);
  }
  return v;
}

constexpr std::size_t features = 16;
constexpr std::size_t local_batch = 8;

// This rank's loss on its own batch of step `step` (different data per rank).
// The input views `x_data`, which must outlive the backward.
ad::tensor local_loss(ad::mlp& model, int rank, int step, std::vector<float>& x_data) {
  const auto seed = static_cast<std::uint64_t>(1000 * step + rank + 1);
  x_data = uniform_noise(local_batch * features, seed);
  std::vector<int> y(local_batch);
  for (std::size_t i = 0; i < local_batch; ++i) y[i] = static_cast<int>((i * 5 + seed) % 4);
  auto x = ad::tensor::from_data(
      x_data.data(), {static_cast<ad::index>(local_batch), static_cast<ad::index>(features)});
  return ad::softmax_cross_entropy(model(x), std::span<const int>(y));
}

struct run_result {
  std::vector<std::vector<float>> params_after_step;  // one snapshot per step
  compress::traffic traffic;
};

}  // namespace

TEST_CASE("compressed data_parallel keeps the ranks bitwise identical and sends fewer bytes",
          "[train][dp][compress]") {
  const int steps = 4;
  for (const std::string spec : {"bf16", "topk:0.1", "int8"}) {
    for (const int p : {2, 3}) {
      INFO("compress " << spec << " ranks " << p);
      std::vector<run_result> out(static_cast<std::size_t>(p));
      local::run(p, [&](communicator& c) {
        ad::mlp model({features, 32, 16, 4}, ad::activation::relu,
                      c.rank() == 0 ? 7 : 100 + static_cast<std::uint64_t>(c.rank()));
        train::data_parallel dp(c, model.parameters(),
                                {.bucket_cap_bytes = 1024,
                                 .first_bucket_cap_bytes = 256,
                                 .compress = spec,
                                 .compress_options = {.seed = 3}});
        ad::adamw opt(model.parameters(), {.lr = 1e-2});
        auto& r = out[static_cast<std::size_t>(c.rank())];
        std::vector<float> x;
        for (int s = 0; s < steps; ++s) {
          opt.zero_grad();
          dp.backward(local_loss(model, c.rank(), s, x));
          dp.step(opt);
          const auto v = model.parameters().all_values();
          r.params_after_step.emplace_back(v.begin(), v.end());
        }
        r.traffic = dp.compression_traffic();
      });
      for (int s = 0; s < steps; ++s) {
        INFO("step " << s);
        const auto& ref = out[0].params_after_step[static_cast<std::size_t>(s)];
        for (int r = 1; r < p; ++r) {
          const auto& got =
              out[static_cast<std::size_t>(r)].params_after_step[static_cast<std::size_t>(s)];
          REQUIRE(got.size() == ref.size());
          REQUIRE(std::memcmp(got.data(), ref.data(), ref.size() * sizeof(float)) == 0);
        }
        REQUIRE(std::all_of(ref.begin(), ref.end(), [](float v) { return std::isfinite(v); }));
        if (s > 0) REQUIRE(ref != out[0].params_after_step[static_cast<std::size_t>(s - 1)]);
      }
      for (const auto& r : out) {
        REQUIRE(r.traffic.calls > 0);
        REQUIRE(r.traffic.bytes_sent > 0);
        REQUIRE(r.traffic.bytes_sent < r.traffic.plain_bytes_sent);
        REQUIRE(r.traffic.payload_bytes < r.traffic.raw_bytes);
      }
    }
  }
}

TEST_CASE("fp16-compressed gradients are within 1e-3 of the uncompressed average",
          "[train][dp][compress]") {
  for (const int p : {2, 3}) {
    INFO("ranks " << p);
    std::vector<std::vector<float>> plain(static_cast<std::size_t>(p)),
        half(static_cast<std::size_t>(p));
    local::run(p, [&](communicator& c) {
      const auto r = static_cast<std::size_t>(c.rank());
      std::vector<float> x;
      // Reference: the same model's local gradient, averaged by a plain allreduce.
      ad::mlp ref({features, 32, 16, 4}, ad::activation::tanh, 11);
      ref.zero_grad();
      local_loss(ref, c.rank(), 0, x).backward();
      auto rg = ref.parameters().all_grads();
      allreduce(c, rg, avg);
      plain[r].assign(rg.begin(), rg.end());

      ad::mlp model({features, 32, 16, 4}, ad::activation::tanh, 11);
      train::data_parallel dp(c, model.parameters(),
                              {.bucket_cap_bytes = 1024, .compress = "fp16"});
      model.zero_grad();
      dp.backward(local_loss(model, c.rank(), 0, x));
      dp.finish();
      const auto g = model.parameters().all_grads();
      half[r].assign(g.begin(), g.end());
    });
    double diff2 = 0, ref2 = 0, worst = 0, largest = 0;
    const auto& want = plain[0];
    for (std::size_t i = 0; i < want.size(); ++i) {
      const double d = static_cast<double>(half[0][i]) - want[i];
      diff2 += d * d;
      ref2 += static_cast<double>(want[i]) * want[i];
      worst = std::max(worst, std::abs(d));
      largest = std::max(largest, std::abs(static_cast<double>(want[i])));
    }
    REQUIRE(ref2 > 0);
    CHECK(std::sqrt(diff2 / ref2) < 1e-3);  // relative L2 error of the whole gradient
    CHECK(worst < 1e-3 * largest);          // every element, relative to the largest
    for (int r = 1; r < p; ++r) REQUIRE(half[static_cast<std::size_t>(r)] == half[0]);
  }
}

TEST_CASE("data_parallel rejects a bad compression spec before training", "[train][dp][compress]") {
  for (const std::string spec : {"zip", "topk:0", "topk:1.5", "powersgd:0", "int8:x"}) {
    INFO(spec);
    bool threw_usage = false;
    local::run(1, [&](communicator& c) {
      ad::mlp model({4, 3}, ad::activation::relu, 1);
      try {
        train::data_parallel dp(c, model.parameters(), {.compress = spec});
      } catch (const usage_error&) {
        threw_usage = true;
      }
    });
    REQUIRE(threw_usage);
  }
  // "none" keeps the plain allreduce and reports no traffic.
  std::string name, bucket0;
  std::size_t sent = 1;
  local::run(1, [&](communicator& c) {
    ad::mlp model({4, 3}, ad::activation::relu, 1);
    train::data_parallel dp(c, model.parameters());
    name = dp.compression();
    bucket0 = dp.compression_of(0);
    sent = dp.compression_traffic().bytes_sent;
  });
  REQUIRE(name == "none");
  REQUIRE(bucket0 == "none");
  REQUIRE(sent == 0);
}
