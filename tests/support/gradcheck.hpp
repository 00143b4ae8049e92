// Central-difference gradient checks in double, shared by the ad tests
// (test_gradcheck.cpp, test_conv.cpp): random_tensor and check_gradients.
#pragma once

#include <cmath>
#include <functional>
#include <string>
#include <vector>

#include "ringflow/ad/autodiff.hpp"
#include "support/catch.hpp"

namespace ad = ringflow::ad;
using dtensor = ad::basic_tensor<double>;
using inputs_t = std::vector<dtensor>;

namespace {  // each test file gets its own copy

// Random values in [lo, hi), seeded; `away` keeps |x| >= away (kinks of relu).
dtensor random_tensor(ad::shape s, std::uint64_t seed, double lo = -1.0, double hi = 1.0,
                      double away = 0.0) {
  ad::generator rng(seed);
  auto t = dtensor::zeros(s, true);
  for (double& x : t.data()) {
    do {
      x = lo + (hi - lo) * ad::uniform01(rng);
    } while (std::abs(x) < away);
  }
  return t;
}

// Checks d(sum(f(inputs) * R))/d(inputs) against central differences, where R
// is a fixed random weight so every output element gets a different seed.
void check_gradients(const std::string& what, inputs_t inputs,
                     const std::function<dtensor(const inputs_t&)>& f) {
  INFO("op: " << what);
  const dtensor probe = f(inputs);
  const dtensor weight = random_tensor(probe.shape(), 777).detach();
  auto objective = [&](const inputs_t& in) { return ad::sum(ad::mul(f(in), weight)); };

  for (auto& x : inputs) x.zero_grad();
  objective(inputs).backward();

  const double h = 1e-6;
  for (std::size_t k = 0; k < inputs.size(); ++k) {
    auto& x = inputs[k];
    if (!x.requires_grad()) continue;
    const std::vector<double> analytic(x.grad_data().begin(), x.grad_data().end());
    for (std::size_t j = 0; j < analytic.size(); ++j) {
      const double orig = x.data()[j];
      x.data()[j] = orig + h;
      const double fp = objective(inputs).item();
      x.data()[j] = orig - h;
      const double fm = objective(inputs).item();
      x.data()[j] = orig;
      const double numeric = (fp - fm) / (2 * h);
      INFO("input " << k << " element " << j << ": analytic " << analytic[j] << " numeric "
                    << numeric);
      CHECK(std::abs(numeric - analytic[j]) <= 1e-6 * (1.0 + std::abs(numeric)));
    }
  }
}

}  // namespace
