// A small synthetic classification task for the serve tests: Gaussian blobs
// (4 classes in 16 dimensions, overlapping a little) and a quick trainer.
#pragma once

#include <cstdint>
#include <random>
#include <vector>

#include "ringflow/ad/autodiff.hpp"

namespace ringflow::testing {

struct blobs {
  std::vector<float> x;  // [n, dims]
  std::vector<std::int32_t> labels;
  int dims = 16;
  int classes = 4;
  std::size_t size() const { return labels.size(); }
};

inline blobs make_blobs(std::size_t n, std::uint64_t seed) {
  blobs b;
  std::mt19937_64 centers_rng(1234);  // the same centers for every split
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> centers(static_cast<std::size_t>(b.classes * b.dims));
  for (auto& c : centers) c = 1.2f * nd(centers_rng);
  std::mt19937_64 rng(seed);
  b.x.resize(n * static_cast<std::size_t>(b.dims));
  b.labels.resize(n);
  for (std::size_t i = 0; i < n; ++i) {
    const int c = static_cast<int>(rng() % static_cast<std::uint64_t>(b.classes));
    b.labels[i] = c;
    for (int d = 0; d < b.dims; ++d) {
      b.x[i * static_cast<std::size_t>(b.dims) + static_cast<std::size_t>(d)] =
          centers[static_cast<std::size_t>(c * b.dims + d)] + nd(rng);
    }
  }
  return b;
}

/// Trains `net` on `data` for `steps` AdamW steps of `batch` rows; `after_step` runs after each.
template <class F>
void train_on(ringflow::ad::sequential& net, const blobs& data, int steps, F&& after_step,
              std::size_t batch = 64, double lr = 3e-3) {
  namespace ad = ringflow::ad;
  ad::adamw opt(net.parameters(), {.lr = lr, .weight_decay = 0.0});
  const std::size_t n = data.size();
  std::vector<int> labels(batch);
  for (int s = 0; s < steps; ++s) {
    const std::size_t start = (static_cast<std::size_t>(s) * batch) % (n - batch + 1);
    for (std::size_t i = 0; i < batch; ++i) labels[i] = data.labels[start + i];
    auto x = ad::tensor::from_data(data.x.data() + start * static_cast<std::size_t>(data.dims),
                                   {static_cast<ad::index>(batch), data.dims});
    auto loss = ad::softmax_cross_entropy(net(x), labels);
    net.zero_grad();
    loss.backward();
    opt.step();
    after_step();
  }
}

inline void train_on(ringflow::ad::sequential& net, const blobs& data, int steps) {
  train_on(net, data, steps, [] {});
}

}  // namespace ringflow::testing
