// Inference models: the copy of an ad model computes what it computes,
// quantization errors stay within half a step, the int8 model classifies a
// synthetic task as well as fp32, every int8 path gives the same bits, and
// pruning and distillation do what they say.
#include <cmath>
#include <cstring>
#include <vector>

#include "ringflow/ad/autodiff.hpp"
#include "ringflow/core/error.hpp"
#include "ringflow/serve/distill.hpp"
#include "ringflow/serve/model.hpp"
#include "ringflow/serve/prune.hpp"
#include "serve/synthetic.hpp"
#include "support/catch.hpp"
#include "support/noise.hpp"

using namespace ringflow;
namespace ad = ringflow::ad;
namespace sv = ringflow::serve;

namespace {

std::vector<float> ad_forward(ad::sequential& net, const std::vector<float>& x, ad::index rows,
                              ad::index cols) {
  ad::no_grad guard;
  auto y = net(ad::tensor::from_data(x.data(), {rows, cols}));
  return {y.data().begin(), y.data().end()};
}

struct trained {
  testing::blobs train = testing::make_blobs(2048, 1);
  testing::blobs test = testing::make_blobs(1024, 2);
  ad::mlp net{{16, 32, 32, 4}, ad::activation::relu, 5};
  trained() { testing::train_on(net, train, 300); }
};

trained& task() {
  static trained t;
  return t;
}

}  // namespace

TEST_CASE("a serve model computes what the ad model computes", "[serve][model]") {
  ad::mlp net({16, 24, 8, 3}, ad::activation::tanh, 9);
  const auto m = sv::model::from_sequential(net);
  const std::vector<ad::index> want_widths{16, 24, 8, 3};
  REQUIRE(m.widths() == want_widths);
  CHECK_FALSE(m.quantized());
  const auto x = testing::noise(5 * 16, 3);
  const auto want = ad_forward(net, x, 5, 16);
  const auto got = m.forward(x, 5);
  REQUIRE(got.size() == want.size());
  for (std::size_t i = 0; i < got.size(); ++i) CHECK(got[i] == Catch::Approx(want[i]).margin(1e-5));

  // copy_to is the inverse: a fresh net with the copied weights computes the same.
  ad::mlp other({16, 24, 8, 3}, ad::activation::tanh, 77);
  m.copy_to(other);
  CHECK(ad_forward(other, x, 5, 16) == want);
  ad::mlp wrong({16, 25, 8, 3}, ad::activation::tanh, 1);
  CHECK_THROWS_AS(m.copy_to(wrong), usage_error);
}

TEST_CASE("a model that does not hold together is refused", "[serve][model]") {
  sv::dense_layer a{
      .in = 4, .out = 3, .weight = std::vector<float>(12, 0.5f), .bias = std::vector<float>(3)};
  sv::dense_layer b{
      .in = 2, .out = 1, .weight = std::vector<float>(2, 0.5f), .bias = std::vector<float>(1)};
  CHECK_THROWS_AS((sv::model(std::vector<sv::dense_layer>{a, b})),
                  usage_error);  // 3 outputs into 2 inputs
  a.bias.resize(2);
  CHECK_THROWS_AS((sv::model(std::vector<sv::dense_layer>{a})), usage_error);
  ad::sequential s;
  s.add(ad::activation_layer(ad::activation::relu));
  CHECK_THROWS_AS(sv::model::from_sequential(s), usage_error);
}

TEST_CASE("quantized weights and inputs are within half a step", "[serve][quantize]") {
  ad::mlp net({16, 32, 4}, ad::activation::relu, 3);
  const auto fp32 = sv::model::from_sequential(net);
  const auto calib = testing::noise(64 * 16, 8);
  const auto q = sv::quantize(fp32, calib.data(), 64);
  REQUIRE(q.quantized());
  for (std::size_t L = 0; L < q.layers().size(); ++L) {
    const auto& f = fp32.layers()[L];
    const auto& l = q.layers()[L];
    REQUIRE(l.qweight.size() == f.weight.size());
    for (ad::index j = 0; j < l.out; ++j) {
      const float s = l.weight_scale[static_cast<std::size_t>(j)];
      float amax = 0;
      for (ad::index r = 0; r < l.in; ++r)
        amax = std::max(amax, std::fabs(f.weight[static_cast<std::size_t>(r * l.out + j)]));
      CHECK(s == Catch::Approx(amax / 127.0f));
      for (ad::index r = 0; r < l.in; ++r) {
        const auto k = static_cast<std::size_t>(r * l.out + j);
        CHECK(l.qweight[k] >= -127);
        CHECK(std::fabs(s * static_cast<float>(l.qweight[k]) - f.weight[k]) <= 0.5f * s * 1.0001f);
      }
    }
    CHECK(l.input.zero_point >= 0);
    CHECK(l.input.zero_point <= 255);
  }
  // The first layer's inputs span [-1, 1): a signed range, zero point near 128.
  CHECK(q.layers()[0].input.zero_point > 100);
  CHECK(q.layers()[0].input.zero_point < 156);
  // The second layer's inputs come out of a relu: non-negative, zero point 0.
  CHECK(q.layers()[1].input.zero_point == 0);
  // Input quantization error: x -> q -> scale * (q - zp) within half a step
  // inside the calibrated range, so the logits stay close.
  const auto yf = fp32.forward(calib, 64);
  const auto yq = q.forward(calib, 64);
  double err = 0, mag = 0;
  for (std::size_t i = 0; i < yf.size(); ++i) {
    err = std::max(err, static_cast<double>(std::fabs(yf[i] - yq[i])));
    mag = std::max(mag, static_cast<double>(std::fabs(yf[i])));
  }
  CHECK(err < 0.05 * mag);
}

TEST_CASE("percentile calibration clips outliers", "[serve][quantize]") {
  ad::mlp net({16, 8, 4}, ad::activation::relu, 3);
  const auto fp32 = sv::model::from_sequential(net);
  auto calib = testing::noise(256 * 16, 9);
  calib[5] = 100.0f;  // one outlier
  const auto mm = sv::quantize(fp32, calib.data(), 256);
  const auto pc =
      sv::quantize(fp32, calib.data(), 256,
                   {.how = sv::calibration_options::method::percentile, .percentile = 99.9});
  CHECK(mm.layers()[0].input.scale > 100.0f / 255.0f);
  CHECK(pc.layers()[0].input.scale < 2.5f / 255.0f);
}

TEST_CASE("the int8 model classifies as well as fp32, the same on every path",
          "[serve][quantize]") {
  auto& t = task();
  const auto fp32 = sv::model::from_sequential(t.net);
  const double acc32 = sv::accuracy(fp32, t.test.x.data(), t.test.labels);
  CHECK(acc32 > 0.85);
  std::vector<float> first;
  for (const auto path : sv::supported_int8_paths()) {
    INFO("path " << sv::to_string(path));
    const auto q = sv::quantize(fp32, t.train.x.data(), 512, {}, path);
    REQUIRE(q.path() == path);
    const double acc8 = sv::accuracy(q, t.test.x.data(), t.test.labels);
    CHECK(acc8 > acc32 - 0.01);
    const auto y = q.forward(std::span<const float>(t.test.x.data(), 100 * 16), 100);
    if (first.empty()) {
      first = y;
    } else {
      REQUIRE(std::memcmp(first.data(), y.data(), y.size() * sizeof(float)) == 0);
    }
  }
}

TEST_CASE("global magnitude pruning removes the smallest weights everywhere", "[serve][prune]") {
  ad::mlp net({16, 32, 32, 4}, ad::activation::relu, 5);
  auto params = net.parameters();
  std::vector<float> before(params.all_values().begin(), params.all_values().end());
  const auto mask = sv::prune_global_magnitude(params, 0.8);
  CHECK(mask.sparsity() == Catch::Approx(0.8).margin(1e-3));
  std::size_t weights = 0, zero = 0;
  float largest_pruned = 0, smallest_kept = 1e30f;
  for (const auto& p : params) {
    const auto v = params.all_values().subspan(p.offset, p.size);
    if (p.name.find("bias") != std::string::npos) {
      for (std::size_t i = 0; i < p.size; ++i) CHECK(v[i] == before[p.offset + i]);  // biases kept
      continue;
    }
    for (std::size_t i = 0; i < p.size; ++i) {
      ++weights;
      const float b = std::fabs(before[p.offset + i]);
      if (v[i] == 0.0f) {
        ++zero;
        largest_pruned = std::max(largest_pruned, b);
      } else {
        smallest_kept = std::min(smallest_kept, b);
        CHECK(v[i] == before[p.offset + i]);
      }
    }
  }
  CHECK(static_cast<double>(zero) / static_cast<double>(weights) ==
        Catch::Approx(0.8).margin(1e-3));
  CHECK(largest_pruned <= smallest_kept);
  // Fine-tuning moves the weights; apply() puts the pruned ones back to zero.
  for (auto& v : params.all_values()) v += 0.25f;
  mask.apply(params);
  CHECK(sv::model::from_sequential(net).nonzero_weights() == weights - zero);
  CHECK_THROWS_AS(sv::prune_global_magnitude(params, 1.0), usage_error);
}

TEST_CASE("pruned fine-tuning keeps accuracy on the synthetic task", "[serve][prune]") {
  auto& t = task();
  ad::mlp net({16, 32, 32, 4}, ad::activation::relu, 5);
  sv::model::from_sequential(t.net).copy_to(net);
  auto params = net.parameters();
  const auto mask = sv::prune_global_magnitude(params, 0.8);
  testing::train_on(
      net, t.train, 300, [&] { mask.apply(params); }, 64, 3e-3);
  const auto pruned = sv::model::from_sequential(net);
  CHECK(static_cast<double>(pruned.nonzero_weights()) /
            static_cast<double>(pruned.weight_count()) ==
        Catch::Approx(0.2).margin(1e-3));
  const double dense =
      sv::accuracy(sv::model::from_sequential(t.net), t.test.x.data(), t.test.labels);
  CHECK(sv::accuracy(pruned, t.test.x.data(), t.test.labels) > dense - 0.02);
}

TEST_CASE("structured pruning drops the least important neurons and shrinks the layers",
          "[serve][prune]") {
  // Neurons 0, 2, 4, ... of the hidden layer have no outgoing weights: they
  // cannot matter, so pruning half of them changes nothing.
  const auto w1 = testing::noise(6 * 8, 1);
  auto w2 = testing::noise(8 * 3, 2);
  for (int j = 0; j < 8; j += 2)
    for (int c = 0; c < 3; ++c) w2[static_cast<std::size_t>(j * 3 + c)] = 0.0f;
  const sv::model m(
      {sv::dense_layer{.in = 6,
                       .out = 8,
                       .act = ad::activation::relu,
                       .weight = w1,
                       .bias = testing::noise(8, 3)},
       sv::dense_layer{.in = 8, .out = 3, .weight = w2, .bias = testing::noise(3, 4)}});
  const auto p = sv::prune_neurons(m, 0.5);
  const std::vector<ad::index> want_widths{6, 4, 3};
  REQUIRE(p.widths() == want_widths);
  const auto x = testing::noise(7 * 6, 5);
  const auto a = m.forward(x, 7), b = p.forward(x, 7);
  for (std::size_t i = 0; i < a.size(); ++i) CHECK(b[i] == Catch::Approx(a[i]).margin(1e-5));
  CHECK(sv::prune_neurons(m, 1.0).widths() == m.widths());
  CHECK_THROWS_AS(sv::prune_neurons(m, 0.0), usage_error);
}

TEST_CASE("the distillation loss is the softened cross entropy plus the label loss",
          "[serve][distill]") {
  const auto s = testing::noise(3 * 5, 1), t = testing::noise(3 * 5, 2);
  const std::vector<int> labels{0, 4, 2};
  auto student = ad::tensor::from_vector(s, {3, 5}, /*requires_grad=*/true);
  const auto teacher = ad::tensor::from_vector(t, {3, 5});
  const double T = 2.0;
  // By hand: alpha T^2 mean_b(-sum p log q) + (1 - alpha) CE.
  double soft = 0, hard = 0;
  for (int b = 0; b < 3; ++b) {
    double mt = -1e9, ms = -1e9;
    for (int c = 0; c < 5; ++c) {
      mt = std::max(mt, t[static_cast<std::size_t>(b * 5 + c)] / T);
      ms = std::max(ms, s[static_cast<std::size_t>(b * 5 + c)] / T);
    }
    double zt = 0, zs = 0, z1 = 0;
    for (int c = 0; c < 5; ++c) {
      zt += std::exp(t[static_cast<std::size_t>(b * 5 + c)] / T - mt);
      zs += std::exp(s[static_cast<std::size_t>(b * 5 + c)] / T - ms);
      z1 += std::exp(s[static_cast<std::size_t>(b * 5 + c)]);
    }
    for (int c = 0; c < 5; ++c) {
      const double p = std::exp(t[static_cast<std::size_t>(b * 5 + c)] / T - mt) / zt;
      const double logq = s[static_cast<std::size_t>(b * 5 + c)] / T - ms - std::log(zs);
      soft -= p * logq / 3.0;
    }
    hard -=
        (s[static_cast<std::size_t>(b * 5 + labels[static_cast<std::size_t>(b)])] - std::log(z1)) /
        3.0;
  }
  const auto loss = sv::distillation_loss(student, teacher, labels, T, 0.7);
  CHECK(loss.item() == Catch::Approx(0.7 * T * T * soft + 0.3 * hard).epsilon(1e-5));
  loss.backward();
  CHECK(student.has_grad());
  const auto only_labels = sv::distillation_loss(student, teacher, labels, T, 0.0);
  CHECK(only_labels.item() == Catch::Approx(hard).epsilon(1e-5));
  CHECK_THROWS_AS(sv::distillation_loss(student, teacher, labels, 0.0, 0.5), usage_error);
}
