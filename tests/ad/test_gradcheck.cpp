// Every ad op's gradient against central finite differences, in double precision.
#include <cmath>
#include <functional>
#include <string>
#include <vector>

#include "ringflow/ad/autodiff.hpp"
#include "support/catch.hpp"
#include "support/gradcheck.hpp"

TEST_CASE("gradcheck: matmul", "[ad][gradcheck]") {
  check_gradients("matmul", {random_tensor({3, 4}, 1), random_tensor({4, 5}, 2)},
                  [](const inputs_t& in) { return ad::matmul(in[0], in[1]); });
  check_gradients("matmul rank-1 left", {random_tensor({4}, 3), random_tensor({4, 2}, 4)},
                  [](const inputs_t& in) { return ad::matmul(in[0], in[1]); });
}

TEST_CASE("gradcheck: add sub mul div with broadcasting", "[ad][gradcheck]") {
  using binary = dtensor (*)(const dtensor&, const dtensor&);
  const std::vector<std::pair<std::string, binary>> ops = {
      {"add", [](const dtensor& a, const dtensor& b) { return ad::add(a, b); }},
      {"sub", [](const dtensor& a, const dtensor& b) { return ad::sub(a, b); }},
      {"mul", [](const dtensor& a, const dtensor& b) { return ad::mul(a, b); }},
      {"div", [](const dtensor& a, const dtensor& b) { return ad::div(a, b); }},
  };
  const std::vector<std::pair<ad::shape, ad::shape>> shapes = {
      {{3, 4}, {3, 4}}, {{3, 4}, {1, 4}}, {{3, 4}, {4}}, {{1, 4}, {3, 4}},
      {{3, 4}, {}},     {{3, 1}, {1, 4}}, {{4}, {4}},    {{3, 4}, {3, 1}},
  };
  for (const auto& [name, op] : ops) {
    for (const auto& [sa, sb] : shapes) {
      // div: keep the denominator away from zero.
      const double lo = name == "div" ? 0.5 : -1.0;
      check_gradients(name + " " + sa.str() + " " + sb.str(),
                      {random_tensor(sa, 5), random_tensor(sb, 6, lo, 1.5)},
                      [op](const inputs_t& in) { return op(in[0], in[1]); });
    }
  }
  check_gradients("mul x*x (one input twice)", {random_tensor({2, 3}, 7)},
                  [](const inputs_t& in) { return in[0] * in[0]; });
  check_gradients("scale and unary minus", {random_tensor({2, 3}, 8)},
                  [](const inputs_t& in) { return -(in[0] * 2.5); });
}

TEST_CASE("gradcheck: reductions", "[ad][gradcheck]") {
  check_gradients("sum", {random_tensor({3, 4}, 9)},
                  [](const inputs_t& in) { return ad::sum(in[0]); });
  check_gradients("mean", {random_tensor({3, 4}, 10)},
                  [](const inputs_t& in) { return ad::mean(in[0]); });
  for (int dim : {0, 1}) {
    for (bool keep : {false, true}) {
      const std::string tag = " dim " + std::to_string(dim) + (keep ? " keepdim" : "");
      check_gradients("sum" + tag, {random_tensor({3, 4}, 40)},
                      [=](const inputs_t& in) { return ad::sum(in[0], dim, keep); });
      check_gradients("mean" + tag, {random_tensor({3, 4}, 41)},
                      [=](const inputs_t& in) { return ad::mean(in[0], dim, keep); });
    }
  }
  check_gradients("sum rank 1", {random_tensor({5}, 42)},
                  [](const inputs_t& in) { return ad::sum(in[0], 0); });
  check_gradients("x - mean(x, 1, keepdim)", {random_tensor({3, 4}, 43)},
                  [](const inputs_t& in) { return in[0] - ad::mean(in[0], 1, true); });
}

TEST_CASE("gradcheck: activations", "[ad][gradcheck]") {
  check_gradients("relu", {random_tensor({3, 5}, 11, -1, 1, 0.05)},
                  [](const inputs_t& in) { return ad::relu(in[0]); });
  check_gradients("gelu", {random_tensor({3, 5}, 12, -3, 3)},
                  [](const inputs_t& in) { return ad::gelu(in[0]); });
  check_gradients("tanh", {random_tensor({3, 5}, 13, -2, 2)},
                  [](const inputs_t& in) { return ad::tanh(in[0]); });
  check_gradients("sigmoid", {random_tensor({3, 5}, 14, -3, 3)},
                  [](const inputs_t& in) { return ad::sigmoid(in[0]); });
  check_gradients("exp", {random_tensor({2, 3}, 15)},
                  [](const inputs_t& in) { return ad::exp(in[0]); });
  check_gradients("log", {random_tensor({2, 3}, 16, 0.2, 2.0)},
                  [](const inputs_t& in) { return ad::log(in[0]); });
}

TEST_CASE("gradcheck: softmax family and losses", "[ad][gradcheck]") {
  check_gradients("log_softmax", {random_tensor({4, 5}, 17, -3, 3)},
                  [](const inputs_t& in) { return ad::log_softmax(in[0]); });
  check_gradients("softmax", {random_tensor({4, 5}, 18, -3, 3)},
                  [](const inputs_t& in) { return ad::softmax(in[0]); });
  const std::vector<int> labels = {0, 4, 2, 2};
  check_gradients("softmax_cross_entropy", {random_tensor({4, 5}, 19, -3, 3)},
                  [&](const inputs_t& in) { return ad::softmax_cross_entropy(in[0], labels); });
  check_gradients("mse", {random_tensor({3, 4}, 20), random_tensor({3, 4}, 21)},
                  [](const inputs_t& in) { return ad::mse(in[0], in[1]); });
}

TEST_CASE("gradcheck: shape ops", "[ad][gradcheck]") {
  check_gradients("reshape", {random_tensor({3, 4}, 22)}, [](const inputs_t& in) {
    return ad::tanh(ad::reshape(in[0], {2, 6}));
  });
  check_gradients("flatten", {random_tensor({3, 4}, 23)},
                  [](const inputs_t& in) { return ad::flatten(in[0]) * ad::flatten(in[0]); });
  check_gradients("concat dim 0", {random_tensor({2, 3}, 24), random_tensor({4, 3}, 25)},
                  [](const inputs_t& in) {
                    return ad::concat({in[0], in[1]}, 0);
                  });
  check_gradients("concat dim 1", {random_tensor({2, 3}, 26), random_tensor({2, 1}, 27)},
                  [](const inputs_t& in) {
                    return ad::concat({in[0], in[1], in[0]}, 1);
                  });
  check_gradients("concat rank 1", {random_tensor({3}, 28), random_tensor({2}, 29)},
                  [](const inputs_t& in) {
                    return ad::concat({in[0], in[1]}, 0);
                  });
  check_gradients("slice dim 0", {random_tensor({5, 3}, 30)},
                  [](const inputs_t& in) { return ad::slice(in[0], 0, 1, 4); });
  check_gradients("slice dim 1", {random_tensor({3, 5}, 31)},
                  [](const inputs_t& in) { return ad::slice(in[0], 1, 2, 5); });
  check_gradients("slice rank 1", {random_tensor({6}, 32)},
                  [](const inputs_t& in) { return ad::slice(in[0], 0, 0, 3); });
}

TEST_CASE("gradcheck: dropout with a fixed seed", "[ad][gradcheck]") {
  check_gradients("dropout", {random_tensor({4, 6}, 33)}, [](const inputs_t& in) {
    ad::generator rng(99);  // same mask at every evaluation
    return ad::dropout(in[0], 0.3, rng);
  });
}

TEST_CASE("gradcheck: a small network end to end", "[ad][gradcheck]") {
  check_gradients("linear+gelu+linear+log_softmax",
                  {random_tensor({3, 4}, 34), random_tensor({4, 5}, 35), random_tensor({5}, 36),
                   random_tensor({5, 2}, 37)},
                  [](const inputs_t& in) {
                    auto h = ad::gelu(ad::matmul(in[0], in[1]) + in[2]);
                    return ad::log_softmax(ad::matmul(h, in[3]));
                  });
}
