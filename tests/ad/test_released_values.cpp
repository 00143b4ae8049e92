// parameter_store::release_values: a released value is made on its first read (an op's input in
// forward, before a backward closure, value(), data()), and the results match the packed store.
#include <cstring>
#include <memory>
#include <vector>

#include "ringflow/ad/autodiff.hpp"
#include "support/catch.hpp"

namespace ad = ringflow::ad;

namespace {

std::vector<float> grads_of(ad::mlp& model, const std::vector<float>& x) {
  model.zero_grad();
  auto loss = ad::mean(model(ad::tensor::from_data(x.data(), {3, 5})));
  ad::backward(loss);
  std::vector<float> out;
  for (const auto& p : model.parameters()) {
    const auto g = p.tensor.grad_data();
    out.insert(out.end(), g.begin(), g.end());
  }
  return out;
}

}  // namespace

TEST_CASE("released values are made on first read and give the packed store's results",
          "[ad][release]") {
  std::vector<float> x(15);
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = 0.1f * static_cast<float>(i) - 0.7f;
  ad::mlp model({5, 7, 4}, ad::activation::tanh, 9);
  const auto store = model.parameters();
  const std::vector<float> saved(store.all_values().begin(), store.all_values().end());
  const auto want = grads_of(model, x);

  std::vector<int> made(store.size(), 0);
  store.release_values([&](std::size_t i) {
    ++made[i];
    auto v = std::shared_ptr<float>(new float[store[i].size], std::default_delete<float[]>());
    std::memcpy(v.get(), saved.data() + store[i].offset, store[i].size * sizeof(float));
    return v;
  });
  REQUIRE(store.values_released());
  REQUIRE(store.all_values().empty());
  REQUIRE(store.numel() == saved.size());
  for (const auto& p : store) REQUIRE(p.tensor.node()->value == nullptr);
  // The parameters() handle stays valid (no re-pack) while released.
  REQUIRE(model.parameters().same_store(store));

  // Forward reads each value once; dropping them all before the backward
  // makes the closures read them again.
  model.zero_grad();
  auto loss = ad::mean(model(ad::tensor::from_data(x.data(), {3, 5})));
  for (int m : made) REQUIRE(m == 1);
  for (const auto& p : store) p.tensor.node()->value.reset();
  ad::backward(loss);
  std::vector<float> got;
  for (const auto& p : store) {
    const auto g = p.tensor.grad_data();
    got.insert(got.end(), g.begin(), g.end());
  }
  REQUIRE(got == want);
  // The backward makes every released input of a node before its closures run.
  for (int m : made) REQUIRE(m == 2);
  // value() makes it too.
  store[1].tensor.node()->value.reset();
  REQUIRE(store[1].tensor.value()(0, 0) == saved[store[1].offset]);

  // pack_values gives the store a flat buffer again.
  store.pack_values(saved);
  REQUIRE(!store.values_released());
  REQUIRE(std::vector<float>(store.all_values().begin(), store.all_values().end()) == saved);
  REQUIRE(grads_of(model, x) == want);
  REQUIRE_THROWS_AS(store.pack_values(std::vector<float>(3)), ringflow::usage_error);
  REQUIRE_THROWS_AS(store.release_values({}), ringflow::usage_error);
}
