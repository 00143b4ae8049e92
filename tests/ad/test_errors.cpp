// Shape and usage errors: ringflow::usage_error whose message names the shapes.
#include <string>
#include <vector>

#include "ringflow/ad/autodiff.hpp"
#include "support/catch.hpp"

namespace ad = ringflow::ad;

namespace {
template <class F>
std::string usage_message(F&& f) {
  try {
    f();
  } catch (const ringflow::usage_error& e) {
    return e.what();
  } catch (const std::exception& e) {
    return std::string("wrong exception type: ") + e.what();
  }
  return "no exception";
}

bool contains(const std::string& s, const std::string& part) {
  return s.find(part) != std::string::npos;
}
}  // namespace

TEST_CASE("broadcast errors name both shapes", "[ad][errors]") {
  auto a = ad::tensor::zeros({4, 3});
  auto b = ad::tensor::zeros({1, 5});
  for (auto op : {&ad::add<float>, &ad::sub<float>, &ad::mul<float>, &ad::div<float>}) {
    const auto msg = usage_message([&] { op(a, b); });
    INFO(msg);
    CHECK(contains(msg, "[4,3] and [1,5]"));
  }
  const auto msg = usage_message([&] {
    (void)(ad::tensor::zeros({2, 3}) + ad::tensor::zeros({4}));
  });
  INFO(msg);
  CHECK(contains(msg, "[2,3] and [4]"));
}

TEST_CASE("shape errors of the other ops", "[ad][errors]") {
  auto x = ad::tensor::zeros({4, 3});
  std::string msg;
  msg = usage_message([&] { ad::matmul(x, ad::tensor::zeros({5, 2})); });
  INFO(msg);
  CHECK(contains(msg, "[4,3] and [5,2]"));
  msg = usage_message([&] { ad::mse(x, ad::tensor::zeros({3, 4})); });
  CHECK(contains(msg, "[4,3]"));
  CHECK(contains(msg, "[3,4]"));
  msg = usage_message([&] { ad::concat({x, ad::tensor::zeros({2, 2})}, 0); });
  CHECK(contains(msg, "[4,3] and [2,2]"));
  msg = usage_message([&] { ad::slice(x, 1, 1, 5); });
  CHECK(contains(msg, "[4,3]"));
  msg = usage_message([&] { ad::slice(x, 2, 0, 1); });
  CHECK(contains(msg, "dim 2"));
  msg = usage_message([&] { ad::reshape(x, {5}); });
  CHECK(contains(msg, "[4,3]"));
  CHECK(contains(msg, "[5]"));
  const std::vector<int> labels = {0, 1};
  msg = usage_message([&] { ad::softmax_cross_entropy(x, labels); });
  CHECK(contains(msg, "[4,3]"));
  const std::vector<int> bad = {0, 1, 2, 3};
  msg = usage_message([&] { ad::softmax_cross_entropy(x, bad); });
  CHECK(contains(msg, "label 3"));
  msg = usage_message([&] { ad::shape({1, 2, 3, 4, 5}); });
  CHECK(contains(msg, "5 dimensions"));
  msg = usage_message([&] { ad::tensor::from_vector({1.0f, 2.0f}, {3}); });
  CHECK(contains(msg, "[3]"));
}

TEST_CASE("usage errors of backward, item and layers", "[ad][errors]") {
  auto x = ad::tensor::full({2, 3}, 1.0f, true);
  std::string msg = usage_message([&] { ad::relu(x).backward(); });
  INFO(msg);
  CHECK(contains(msg, "[2,3]"));
  msg = usage_message([&] { ad::tensor::zeros({2}).backward(); });
  CHECK(contains(msg, "does not require grad"));
  msg = usage_message([&] { (void)x.item(); });
  CHECK(contains(msg, "[2,3]"));
  msg = usage_message([&] { (void)ad::tensor().shape(); });
  CHECK(contains(msg, "empty"));
  ad::linear layer(5, 2);
  msg = usage_message([&] { layer(x); });
  CHECK(contains(msg, "[2,3]"));
  msg = usage_message([&] { ad::mlp({10}); });
  CHECK(contains(msg, "at least"));
  msg = usage_message([&] { ad::relu(x).set_requires_grad(); });
  CHECK(contains(msg, "relu"));
  ad::generator rng(1);
  msg = usage_message([&] { ad::dropout(x, 1.0, rng); });
  CHECK(contains(msg, "[0, 1)"));
  msg = usage_message([&] { ad::step_lr(0.1, 0); });
  CHECK(contains(msg, "step_size"));
}
