// Graph behaviour: deep chains, accumulation, no_grad, grad-ready hooks,
// two-phase backward and contiguous parameter storage.
#include <cmath>
#include <map>
#include <string>
#include <vector>

#include "ringflow/ad/autodiff.hpp"
#include "support/catch.hpp"

namespace ad = ringflow::ad;
using dtensor = ad::basic_tensor<double>;

namespace {
bool near(double a, double b, double tol) { return std::abs(a - b) <= tol * (1.0 + std::abs(b)); }

dtensor random_input(ad::shape s, std::uint64_t seed) {
  ad::generator rng(seed);
  auto t = dtensor::zeros(s);
  for (double& x : t.data()) x = 2.0 * ad::uniform01(rng) - 1.0;
  return t;
}
}  // namespace

TEST_CASE("a 100,000-op chain: backward and teardown without recursion", "[ad][graph]") {
  constexpr int depth = 100000;
  auto x = dtensor::scalar(1.0, true);
  {
    dtensor y = x;
    for (int i = 0; i < depth; ++i) y = ad::scale(y, 1.00001);
    y.backward();
    CHECK(near(x.grad()(0, 0), std::pow(1.00001, depth), 1e-9));
  }  // the whole chain dies here
  {
    // Fan-in: x feeds every op, so x's pending count is 100,000.
    x.zero_grad();
    dtensor y = x;
    for (int i = 0; i < depth; ++i) y = ad::add(y, x);
    y.backward();
    CHECK(x.grad()(0, 0) == depth + 1.0);
  }
  {
    // Teardown of a chain that never ran backward.
    dtensor y = x;
    for (int i = 0; i < depth; ++i) y = ad::tanh(y);
  }
  SUCCEED("no stack overflow");
}

TEST_CASE("leaves accumulate gradients until zero_grad", "[ad][graph]") {
  auto x = dtensor::from_vector({1.0, 2.0, 3.0}, {3}, true);
  auto loss = ad::sum(x * x);
  loss.backward();
  CHECK(x.grad()(0, 2) == 6.0);
  loss.backward();  // the graph is kept: a second backward accumulates
  CHECK(x.grad()(0, 2) == 12.0);
  ad::sum(x).backward();
  CHECK(x.grad()(0, 2) == 13.0);
  x.zero_grad();
  CHECK(x.grad().isZero());
}

TEST_CASE("backward seeded with a grad_output", "[ad][graph]") {
  auto x = dtensor::from_vector({1.0, 2.0}, {1, 2}, true);
  auto y = x * x;
  ad::backward(y, dtensor::from_vector({10.0, 100.0}, {1, 2}));
  CHECK(x.grad()(0, 0) == 20.0);
  CHECK(x.grad()(0, 1) == 400.0);
}

TEST_CASE("no_grad records no graph and is scoped", "[ad][graph]") {
  auto x = ad::tensor::full({2, 2}, 1.0f, true);
  CHECK(ad::grad_enabled());
  {
    ad::no_grad guard;
    CHECK_FALSE(ad::grad_enabled());
    auto y = ad::relu(x) + x;
    CHECK_FALSE(y.requires_grad());
    CHECK(y.is_leaf());
    ad::generator rng(1);
    auto d = ad::dropout(x, 0.5, rng);
    CHECK(d.node() == x.node());  // identity
    { ad::no_grad nested; }
    CHECK_FALSE(ad::grad_enabled());
  }
  CHECK(ad::grad_enabled());
  CHECK(ad::relu(x).requires_grad());
}

TEST_CASE("from_data views the caller's buffer without copying", "[ad][graph]") {
  std::vector<float> buffer = {1, 2, 3, 4, 5, 6};
  auto x = ad::tensor::from_data(buffer.data(), {2, 3});
  CHECK(x.data().data() == buffer.data());
  CHECK(x.value()(1, 2) == 6.0f);
  buffer[0] = 10.0f;
  CHECK(x.value()(0, 0) == 10.0f);
  auto y = ad::tensor::from_data(std::span<const float>(buffer), {3, 2});
  CHECK(y.data().data() == buffer.data());
  CHECK_THROWS_AS(ad::tensor::from_data(std::span<const float>(buffer), {4, 2}),
                  ringflow::usage_error);
}

TEST_CASE("contiguous parameter storage: all_grads aliases every parameter", "[ad][storage]") {
  ad::mlp model({5, 7, 3}, ad::activation::relu, 1);
  auto params = model.parameters();
  REQUIRE(params.size() == 4);
  CHECK(params[0].name == "0.weight");
  CHECK(params[1].name == "0.bias");
  CHECK(params[2].name == "2.weight");
  CHECK(params[3].name == "2.bias");
  std::size_t expect_offset = 0;
  for (const auto& p : params) {
    CHECK(p.offset == expect_offset);
    CHECK(static_cast<ad::index>(p.size) == p.tensor.numel());
    CHECK(p.tensor.value().data() == params.all_values().data() + p.offset);
    CHECK(p.tensor.grad().data() == params.all_grads().data() + p.offset);
    expect_offset += p.size;
  }
  CHECK(params.numel() == expect_offset);
  CHECK(params.numel() == 5 * 7 + 7 + 7 * 3 + 3);

  // Gradients written by backward are visible through all_grads().
  auto x = ad::tensor::full({2, 5}, 0.5f);
  ad::sum(model(x)).backward();
  const auto& w = params.at("2.weight");
  CHECK(params.all_grads()[w.offset + 4] == w.tensor.grad().data()[4]);
  // And writes through all_grads() (an in-place allreduce) are seen by the parameter.
  params.all_grads()[w.offset] = 42.0f;
  CHECK(w.tensor.grad()(0, 0) == 42.0f);
  // The same store comes back while the model is unchanged.
  CHECK(model.parameters().same_store(params));
  model.zero_grad();
  for (float g : params.all_grads()) CHECK(g == 0.0f);
}

TEST_CASE("parameter_store::add keeps values when it grows", "[ad][storage]") {
  ad::parameter_store<double> store;
  auto a = store.add("a", {2});
  a.value()(0, 1) = 3.0;
  auto b = store.add("b", {3});
  CHECK(a.value()(0, 1) == 3.0);
  CHECK(store.numel() == 5);
  CHECK(&store.all_values()[1] == a.value().data() + 1);
  CHECK(&store.all_values()[2] == b.value().data());
}

TEST_CASE("re-packing a sub-module makes its old store stale", "[ad][storage]") {
  ad::sequential net;
  auto& first = net.add(ad::linear(3, 2, 1));
  auto inner = first.parameters();
  CHECK_NOTHROW(inner.check_bound());
  auto outer = net.parameters();
  CHECK_THROWS_AS(inner.check_bound(), ringflow::usage_error);
  CHECK_NOTHROW(outer.check_bound());
  CHECK(outer[0].name == "0.weight");
}

TEST_CASE("grad-ready hook: once per parameter per backward, after the last contribution",
          "[ad][hooks]") {
  ad::basic_mlp<double> model({4, 6, 5, 3}, ad::activation::tanh, 7);
  auto params = model.parameters();
  std::vector<int> fired(params.size(), 0);
  std::vector<std::vector<double>> seen(params.size());
  std::vector<std::size_t> order;
  params.set_grad_ready_hook([&](std::size_t i, const dtensor& p) {
    ++fired[i];
    order.push_back(i);
    seen[i].assign(p.grad_data().begin(), p.grad_data().end());
  });
  const std::vector<int> labels = {0, 2, 1};
  for (int step = 0; step < 2; ++step) {
    std::fill(fired.begin(), fired.end(), 0);
    order.clear();
    model.zero_grad();
    auto loss = ad::softmax_cross_entropy(model(random_input({3, 4}, 11 + step)), labels);
    loss.backward();
    for (std::size_t i = 0; i < params.size(); ++i) {
      INFO("parameter " << params[i].name << " step " << step);
      CHECK(fired[i] == 1);
      const auto final_grad = params[i].tensor.grad_data();
      CHECK(std::equal(seen[i].begin(), seen[i].end(), final_grad.begin()));
    }
    // The last layer's gradients complete before the first layer's.
    REQUIRE(order.size() == params.size());
    CHECK(order.front() >= 4);
    CHECK(order.back() <= 1);
  }
}

TEST_CASE("grad-ready hook of a parameter used twice fires after both uses", "[ad][hooks]") {
  ad::parameter_store<double> store;
  auto w = store.add("w", {3, 3});
  ad::generator rng(5);
  for (double& v : w.data()) v = ad::uniform01(rng) - 0.5;
  int fired = 0;
  std::vector<double> seen;
  store.set_grad_ready_hook([&](std::size_t, const dtensor& p) {
    ++fired;
    seen.assign(p.grad_data().begin(), p.grad_data().end());
  });
  auto x = random_input({2, 3}, 3);
  auto loss = ad::sum(ad::matmul(ad::tanh(ad::matmul(x, w)), w));
  for (bool defer : {false, true}) {
    fired = 0;
    store.zero_grad();
    auto pass = ad::backward(loss, {.defer_weight_grads = defer});
    CHECK(fired == (defer ? 0 : 1));
    pass.run();
    CHECK(fired == 1);
    CHECK(std::equal(seen.begin(), seen.end(), w.grad_data().begin()));
  }
}

TEST_CASE("two-phase backward gives the one-phase gradients", "[ad][two-phase]") {
  ad::basic_mlp<double> model({4, 8, 8, 3}, ad::activation::gelu, 3);
  auto params = model.parameters();
  const std::vector<int> labels = {1, 0, 2, 2, 1};
  auto x = random_input({5, 4}, 21).set_requires_grad();

  ad::softmax_cross_entropy(model(x), labels).backward();
  const std::vector<double> reference(params.all_grads().begin(), params.all_grads().end());
  const std::vector<double> reference_x(x.grad_data().begin(), x.grad_data().end());

  model.zero_grad();
  x.zero_grad();
  int fired = 0;
  params.set_grad_ready_hook([&](std::size_t, const dtensor&) { ++fired; });
  auto loss = ad::softmax_cross_entropy(model(x), labels);
  auto pass = ad::backward(loss, {.defer_weight_grads = true});
  // Phase 1: the input gradient is complete, parameter gradients untouched.
  CHECK(pass.size() == params.size());
  CHECK(fired == 0);
  for (double g : params.all_grads()) CHECK(g == 0.0);
  for (std::size_t i = 0; i < reference_x.size(); ++i) {
    CHECK(near(x.grad_data()[i], reference_x[i], 1e-12));
  }
  // Phase 2.
  ad::run_weight_grads(pass);
  CHECK(pass.empty());
  CHECK(fired == static_cast<int>(params.size()));
  for (std::size_t i = 0; i < reference.size(); ++i) {
    CHECK(near(params.all_grads()[i], reference[i], 1e-12));
  }
}

TEST_CASE("two-phase backward with interleaved micro-batches", "[ad][two-phase]") {
  ad::basic_mlp<double> model({3, 6, 2}, ad::activation::relu, 9);
  auto params = model.parameters();
  auto x1 = random_input({4, 3}, 31);
  auto x2 = random_input({2, 3}, 32);
  const std::vector<int> l1 = {0, 1, 1, 0}, l2 = {1, 0};

  ad::softmax_cross_entropy(model(x1), l1).backward();
  ad::softmax_cross_entropy(model(x2), l2).backward();
  const std::vector<double> reference(params.all_grads().begin(), params.all_grads().end());

  model.zero_grad();
  std::vector<int> fired(params.size(), 0);
  params.set_grad_ready_hook([&](std::size_t i, const dtensor&) { ++fired[i]; });
  auto loss1 = ad::softmax_cross_entropy(model(x1), l1);
  auto loss2 = ad::softmax_cross_entropy(model(x2), l2);
  auto w1 = ad::backward(loss1, {.defer_weight_grads = true});  // B(1)
  auto w2 = ad::backward(loss2, {.defer_weight_grads = true});  // B(2)
  w1.run();                                                     // W(1)
  for (int f : fired) CHECK(f == 1);
  w2.run();  // W(2)
  for (int f : fired) CHECK(f == 2);
  for (std::size_t i = 0; i < reference.size(); ++i) {
    CHECK(near(params.all_grads()[i], reference[i], 1e-12));
  }
}

TEST_CASE("a frozen parameter gets no gradient and no hook", "[ad][hooks]") {
  ad::basic_linear<double> layer(3, 2, 1);
  auto params = layer.parameters();
  auto bias = layer.bias();
  bias.set_requires_grad(false);  // freeze the bias (handles share the node)
  std::vector<int> fired(params.size(), 0);
  params.set_grad_ready_hook([&](std::size_t i, const dtensor&) { ++fired[i]; });
  ad::sum(layer(random_input({4, 3}, 1))).backward();
  CHECK(fired[0] == 1);
  CHECK(fired[1] == 0);
  CHECK(layer.bias().grad().isZero());
  CHECK_FALSE(layer.weight().grad().isZero());
}
