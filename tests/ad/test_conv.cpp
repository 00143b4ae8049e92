// Gradients of the CNN ops (conv2d, pooling, layer norm) and of a custom op
// against central finite differences, in double; plus their shape errors.
#include <cmath>
#include <functional>
#include <span>
#include <string>
#include <vector>

#include "ringflow/ad/autodiff.hpp"
#include "support/catch.hpp"
#include "support/gradcheck.hpp"

TEST_CASE("gradcheck: conv2d", "[ad][gradcheck][cnn]") {
  struct conv_case {
    ad::shape x, w;
    ad::index stride, padding;
    bool bias;
  };
  const std::vector<conv_case> cases = {
      {{1, 1, 4, 4}, {1, 1, 3, 3}, 1, 0, true},   // the smallest
      {{2, 3, 5, 4}, {4, 3, 3, 3}, 1, 1, true},   // batch, channels, non-square, padding
      {{2, 2, 7, 6}, {3, 2, 3, 3}, 2, 1, true},   // stride 2 with padding
      {{1, 2, 6, 5}, {2, 2, 2, 3}, 2, 0, false},  // non-square kernel, no bias
      {{2, 1, 5, 5}, {2, 1, 1, 1}, 1, 0, true},   // 1x1
  };
  std::uint64_t seed = 10;
  for (const auto& c : cases) {
    inputs_t in;  // (built by push_back: GCC 12 warns falsely on an init list + push_back)
    in.push_back(random_tensor(c.x, seed++));
    in.push_back(random_tensor(c.w, seed++));
    if (c.bias) in.push_back(random_tensor({c.w[0]}, seed++));
    const auto what = "conv2d x " + c.x.str() + " w " + c.w.str() + " stride " +
                      std::to_string(c.stride) + " pad " + std::to_string(c.padding);
    check_gradients(what, in, [&](const inputs_t& v) {
      return ad::conv2d(v[0], v[1], v.size() > 2 ? v[2] : dtensor(), c.stride, c.padding);
    });
  }
}

TEST_CASE("conv2d: values against a direct loop", "[ad][cnn]") {
  const auto x = random_tensor({2, 3, 6, 5}, 1);
  const auto w = random_tensor({4, 3, 3, 2}, 2);
  const auto b = random_tensor({4}, 3);
  const ad::index s = 2, p = 1;
  const auto y = ad::conv2d(x, w, b, s, p);
  REQUIRE(y.shape() == ad::shape{2, 4, 3, 3});
  const auto xv = x.data(), wv = w.data(), yv = y.data();
  for (ad::index n = 0; n < 2; ++n)
    for (ad::index o = 0; o < 4; ++o)
      for (ad::index i = 0; i < 3; ++i)
        for (ad::index j = 0; j < 3; ++j) {
          double acc = b.data()[static_cast<std::size_t>(o)];
          for (ad::index c = 0; c < 3; ++c)
            for (ad::index ki = 0; ki < 3; ++ki)
              for (ad::index kj = 0; kj < 2; ++kj) {
                const ad::index ih = i * s - p + ki, iw = j * s - p + kj;
                if (ih < 0 || ih >= 6 || iw < 0 || iw >= 5) continue;
                acc += xv[static_cast<std::size_t>(((n * 3 + c) * 6 + ih) * 5 + iw)] *
                       wv[static_cast<std::size_t>(((o * 3 + c) * 3 + ki) * 2 + kj)];
              }
          CHECK(std::abs(yv[static_cast<std::size_t>(((n * 4 + o) * 3 + i) * 3 + j)] - acc) <
                1e-12);
        }
}

TEST_CASE("gradcheck: max_pool2d and avg_pool2d", "[ad][gradcheck][cnn]") {
  struct pool_case {
    ad::shape x;
    ad::index kernel, stride, padding;
  };
  const std::vector<pool_case> cases = {
      {{1, 1, 4, 4}, 2, 0, 0},  // stride = kernel
      {{2, 3, 5, 6}, 3, 2, 1},  // overlapping, padded, non-square, batch, channels
      {{2, 2, 7, 5}, 2, 1, 0},  // stride 1
      {{1, 2, 5, 5}, 3, 3, 1},
  };
  std::uint64_t seed = 40;
  for (const auto& c : cases) {
    // Distinct values (a tie in a max window has no derivative).
    auto x = random_tensor(c.x, seed++);
    for (std::size_t i = 0; i < x.data().size(); ++i) x.data()[i] += 0.01 * static_cast<double>(i);
    const auto tag = " x " + c.x.str() + " k " + std::to_string(c.kernel) + " s " +
                     std::to_string(c.stride) + " p " + std::to_string(c.padding);
    check_gradients("max_pool2d" + tag, {x}, [&](const inputs_t& v) {
      return ad::max_pool2d(v[0], c.kernel, c.stride, c.padding);
    });
    check_gradients("avg_pool2d" + tag, {x}, [&](const inputs_t& v) {
      return ad::avg_pool2d(v[0], c.kernel, c.stride, c.padding);
    });
  }
}

TEST_CASE("max_pool2d and avg_pool2d values", "[ad][cnn]") {
  auto x = dtensor::from_vector({1, 5, 2, 0, 3, 4, 8, 1, 0, 0, 7, 6, 9, 2, 1, 1}, {1, 1, 4, 4});
  const auto m = ad::max_pool2d(x, 2);
  REQUIRE(m.shape() == ad::shape{1, 1, 2, 2});
  CHECK(std::vector<double>(m.data().begin(), m.data().end()) == std::vector<double>{5, 8, 9, 7});
  const auto a = ad::avg_pool2d(x, 2);
  CHECK(std::vector<double>(a.data().begin(), a.data().end()) ==
        std::vector<double>{13.0 / 4, 11.0 / 4, 11.0 / 4, 15.0 / 4});
}

TEST_CASE("gradcheck: layer_norm", "[ad][gradcheck][cnn]") {
  check_gradients("layer_norm [3,5]",
                  {random_tensor({3, 5}, 60), random_tensor({5}, 61), random_tensor({5}, 62)},
                  [](const inputs_t& v) { return ad::layer_norm(v[0], v[1], v[2]); });
  check_gradients(
      "layer_norm image [2,2,3,2]",
      {random_tensor({2, 2, 3, 2}, 63), random_tensor({12}, 64), random_tensor({12}, 65)},
      [](const inputs_t& v) { return ad::layer_norm(v[0], v[1], v[2]); });
  check_gradients("layer_norm no affine", {random_tensor({4, 6}, 66)},
                  [](const inputs_t& v) { return ad::layer_norm(v[0], dtensor(), dtensor()); });
}

TEST_CASE("layer_norm normalizes each row", "[ad][cnn]") {
  const auto y = ad::layer_norm(random_tensor({3, 8}, 70, -3, 5), dtensor(), dtensor(), 0.0);
  for (ad::index r = 0; r < 3; ++r) {
    CHECK(std::abs(y.value().row(r).mean()) < 1e-12);
    CHECK(std::abs(y.value().row(r).squaredNorm() / 8 - 1) < 1e-9);
  }
}

TEST_CASE("gradcheck: a custom op with its own backward", "[ad][gradcheck][custom_op]") {
  // y = a * b^2 elementwise, written as a custom op.
  auto op = [](const dtensor& a, const dtensor& b) {
    return ad::custom_op<double>(
        "a_times_b_squared", {a, b}, a.shape(),
        [](const std::vector<std::span<const double>>& in, std::span<double> out) {
          for (std::size_t i = 0; i < out.size(); ++i) out[i] = in[0][i] * in[1][i] * in[1][i];
        },
        [](const ad::custom_grad_args<double>& g) {
          for (std::size_t i = 0; i < g.grad_input.size(); ++i) {
            const double a = g.inputs[0][i], b = g.inputs[1][i];
            g.grad_input[i] += g.grad_output[i] * (g.input == 0 ? b * b : 2 * a * b);
          }
        });
  };
  const auto y = op(random_tensor({2, 3}, 80), random_tensor({2, 3}, 81));
  CHECK(y.name() == "a_times_b_squared");
  // Composed with library ops on both sides, so accumulation is exercised too.
  check_gradients("custom op", {random_tensor({2, 3}, 82), random_tensor({2, 3}, 83)},
                  [&](const inputs_t& v) { return ad::relu(op(ad::tanh(v[0]), v[1])) + v[0]; });
}

TEST_CASE("cnn ops: bad shapes throw usage_error naming the op and shapes", "[ad][cnn]") {
  auto message = [](auto&& f) -> std::string {
    try {
      f();
    } catch (const ringflow::usage_error& e) {
      return e.what();
    }
    return "no usage_error";
  };
  auto has = [](const std::string& s, const std::string& part) {
    INFO(s);
    CHECK(s.find(part) != std::string::npos);
  };
  const auto img = dtensor::zeros({2, 3, 8, 8});
  const auto w = dtensor::zeros({4, 3, 3, 3});
  auto m = message([&] { ad::conv2d(dtensor::zeros({2, 192}), w, dtensor()); });
  has(m, "ad::conv2d");
  has(m, "[2,192]");
  m = message([&] { ad::conv2d(img, dtensor::zeros({4, 2, 3, 3}), dtensor()); });
  has(m, "3 channels");
  has(m, "[4,2,3,3]");
  has(message([&] { ad::conv2d(img, w, dtensor::zeros({5})); }), "bias of shape [5]");
  has(message([&] { ad::conv2d(img, dtensor::zeros({4, 3, 11, 11}), dtensor()); }), "larger than");
  has(message([&] { ad::conv2d(img, w, dtensor(), 0); }), "stride 0");
  has(message([&] { ad::max_pool2d(img, 2, 2, 2); }), "ad::max_pool2d");
  m = message([&] { ad::avg_pool2d(dtensor::zeros({8, 8}), 2); });
  has(m, "ad::avg_pool2d");
  has(m, "[8,8]");
  m = message([&] { ad::layer_norm(img, dtensor::zeros({5}), dtensor::zeros({5})); });
  has(m, "ad::layer_norm");
  has(m, "192");
  has(message([&] { ad::matmul(img, dtensor::zeros({192, 2})); }), "ad::matmul");
  has(message([&] { ad::flatten(dtensor::zeros({4}), 1); }), "ad::flatten");
  // Rank-4 shapes compare dimension by dimension, and broadcasting keeps them.
  CHECK_FALSE(ad::shape{2, 3, 4, 5} == ad::shape{2, 5, 4, 3});
  CHECK((img + dtensor::zeros({192})).shape() == img.shape());
  CHECK(ad::flatten(img, 1).shape() == ad::shape{2, 192});
}

TEST_CASE("cnn layers: a small CNN in sequential trains and keeps its shapes", "[ad][cnn]") {
  ad::basic_sequential<double> net;
  net.add(ad::basic_reshape_layer<double>({1, 6, 6}));
  net.add(ad::basic_conv2d_layer<double>(1, 3, 3, 1, 1, /*seed=*/1));
  net.add(ad::basic_activation_layer<double>(ad::activation::relu));
  net.add(ad::basic_max_pool2d_layer<double>(2));
  net.add(ad::basic_layer_norm_layer<double>(3 * 3 * 3));
  net.add(ad::basic_avg_pool2d_layer<double>(3));
  net.add(ad::basic_flatten_layer<double>());
  net.add(ad::basic_linear<double>(3, 2, 2));
  auto params = net.parameters();
  CHECK(params.size() == 6);  // conv w,b; ln gamma,beta; linear w,b
  const auto x = random_tensor({4, 36}, 90).detach();
  const std::vector<int> labels{0, 1, 1, 0};
  const auto logits = net(x);
  REQUIRE(logits.shape() == ad::shape{4, 2});
  double first = 0, last = 0;
  for (int step = 0; step < 200; ++step) {
    net.zero_grad();
    auto loss = ad::softmax_cross_entropy(net(x), labels);
    if (step == 0) first = loss.item();
    last = loss.item();
    loss.backward();
    for (auto& p : params) p.tensor.value() -= 0.2 * p.tensor.grad();
  }
  CHECK(last < 0.5 * first);
}
