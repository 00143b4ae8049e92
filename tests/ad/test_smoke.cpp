// Smoke test placeholder for ringflow::ad.
#include "support/catch.hpp"

#include "ringflow/ad/autodiff.hpp"

TEST_CASE("ad smoke", "[ad]") {
  namespace ad = ringflow::ad;
  auto x = ad::tensor::full({2, 3}, 1.0f, true);
  auto loss = ad::sum(x * x);
  loss.backward();
  CHECK(x.grad()(0, 0) == 2.0f);
}
