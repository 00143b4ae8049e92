// Global magnitude pruning with masks, and structured (whole-neuron) pruning.
#include "ringflow/serve/prune.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <numeric>

#include "ringflow/core/error.hpp"

namespace ringflow::serve {

namespace {

bool is_weight_matrix(const ad::parameter_info<float>& p) {
  const std::string& n = p.name;
  const std::string suffix = "weight";
  return p.tensor.shape().rank() == 2 && n.size() >= suffix.size() &&
         n.compare(n.size() - suffix.size(), suffix.size(), suffix) == 0;
}

}  // namespace

void pruning_mask::apply(const ad::parameter_store<float>& params) const {
  for (const auto& [name, keep] : masks_) {
    const auto& p = params.at(name);
    if (p.size != keep.size()) {
      throw usage_error(fmt::format("serve::pruning_mask::apply: '{}' has {} elements, the mask {}",
                                    name, p.size, keep.size()));
    }
    const std::span<float> v = params.all_values().subspan(p.offset, p.size);
    for (std::size_t i = 0; i < keep.size(); ++i) {
      if (keep[i] == 0) v[i] = 0.0f;
    }
  }
}

double pruning_mask::sparsity() const noexcept {
  std::size_t total = 0, pruned = 0;
  for (const auto& [name, keep] : masks_) {
    total += keep.size();
    pruned += static_cast<std::size_t>(std::count(keep.begin(), keep.end(), std::uint8_t{0}));
  }
  return total == 0 ? 0.0 : static_cast<double>(pruned) / static_cast<double>(total);
}

pruning_mask prune_global_magnitude(const ad::parameter_store<float>& params, double sparsity) {
  if (!(sparsity >= 0.0 && sparsity < 1.0)) {
    throw usage_error(
        fmt::format("serve::prune_global_magnitude: sparsity {} is not in [0, 1)", sparsity));
  }
  std::vector<float> mags;
  for (const auto& p : params) {
    if (!is_weight_matrix(p)) continue;
    for (const float v : params.all_values().subspan(p.offset, p.size))
      mags.push_back(std::fabs(v));
  }
  if (mags.empty())
    throw usage_error("serve::prune_global_magnitude: the model has no weight matrix");
  const auto k = static_cast<std::size_t>(std::floor(sparsity * static_cast<double>(mags.size())));
  // Prune exactly k weights: those below the k-th smallest magnitude, then
  // ties at it in parameter order until k are gone.
  float threshold = -1.0f;
  std::size_t below = 0;
  if (k > 0) {
    std::vector<float> sorted = mags;
    std::nth_element(sorted.begin(), sorted.begin() + static_cast<std::ptrdiff_t>(k - 1),
                     sorted.end());
    threshold = sorted[k - 1];
    below = static_cast<std::size_t>(
        std::count_if(mags.begin(), mags.end(), [&](float m) { return m < threshold; }));
  }
  std::size_t ties_left = k - below;
  pruning_mask mask;
  for (const auto& p : params) {
    if (!is_weight_matrix(p)) continue;
    std::vector<std::uint8_t> keep(p.size, 1);
    const std::span<float> v = params.all_values().subspan(p.offset, p.size);
    for (std::size_t i = 0; i < p.size; ++i) {
      const float m = std::fabs(v[i]);
      if (m < threshold || (m == threshold && ties_left > 0 && (--ties_left, true))) keep[i] = 0;
    }
    mask.masks_.emplace_back(p.name, std::move(keep));
  }
  mask.apply(params);
  return mask;
}

model prune_neurons(const model& fp32, double keep_fraction) {
  if (fp32.empty() || fp32.quantized())
    throw usage_error("serve::prune_neurons: needs a non-empty fp32 model");
  if (!(keep_fraction > 0.0 && keep_fraction <= 1.0)) {
    throw usage_error(
        fmt::format("serve::prune_neurons: keep fraction {} is not in (0, 1]", keep_fraction));
  }
  std::vector<dense_layer> layers = fp32.layers();
  for (std::size_t L = 0; L + 1 < layers.size(); ++L) {
    dense_layer& a = layers[L];      // produces the hidden neurons
    dense_layer& b = layers[L + 1];  // consumes them
    const index width = a.out;
    const auto keep_n = std::max<index>(
        1, static_cast<index>(std::lround(keep_fraction * static_cast<double>(width))));
    std::vector<double> importance(static_cast<std::size_t>(width));
    for (index j = 0; j < width; ++j) {
      double in2 = static_cast<double>(a.bias[static_cast<std::size_t>(j)]) *
                   a.bias[static_cast<std::size_t>(j)];
      for (index r = 0; r < a.in; ++r) {
        const double w = a.weight[static_cast<std::size_t>(r * a.out + j)];
        in2 += w * w;
      }
      double out2 = 0;
      for (index c = 0; c < b.out; ++c) {
        const double w = b.weight[static_cast<std::size_t>(j * b.out + c)];
        out2 += w * w;
      }
      importance[static_cast<std::size_t>(j)] = std::sqrt(in2) * std::sqrt(out2);
    }
    std::vector<index> order(static_cast<std::size_t>(width));
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](index x, index y) {
      return importance[static_cast<std::size_t>(x)] > importance[static_cast<std::size_t>(y)];
    });
    std::vector<index> kept(order.begin(), order.begin() + keep_n);
    std::sort(kept.begin(), kept.end());
    // a: keep columns `kept`; b: keep rows `kept`.
    std::vector<float> aw(static_cast<std::size_t>(a.in * keep_n)),
        ab(static_cast<std::size_t>(keep_n));
    for (index r = 0; r < a.in; ++r)
      for (index c = 0; c < keep_n; ++c) {
        aw[static_cast<std::size_t>(r * keep_n + c)] =
            a.weight[static_cast<std::size_t>(r * a.out + kept[static_cast<std::size_t>(c)])];
      }
    for (index c = 0; c < keep_n; ++c)
      ab[static_cast<std::size_t>(c)] =
          a.bias[static_cast<std::size_t>(kept[static_cast<std::size_t>(c)])];
    std::vector<float> bw(static_cast<std::size_t>(keep_n * b.out));
    for (index r = 0; r < keep_n; ++r)
      for (index c = 0; c < b.out; ++c) {
        bw[static_cast<std::size_t>(r * b.out + c)] =
            b.weight[static_cast<std::size_t>(kept[static_cast<std::size_t>(r)] * b.out + c)];
      }
    a.weight = std::move(aw);
    a.bias = std::move(ab);
    a.out = keep_n;
    b.weight = std::move(bw);
    b.in = keep_n;
  }
  return model(std::move(layers), fp32.path());
}

}  // namespace ringflow::serve
