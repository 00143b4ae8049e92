// Portable uniform/normal transforms over mt19937_64 and the weight initializers.
#include "ringflow/ad/init.hpp"

#include <fmt/format.h>

#include <cmath>
#include <numbers>

namespace ringflow::ad {

double uniform01(generator& rng) { return static_cast<double>(rng() >> 11) * 0x1.0p-53; }

double normal01(generator& rng) {
  const double u1 = 1.0 - uniform01(rng);  // (0, 1]: log is finite
  const double u2 = uniform01(rng);
  return std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * std::numbers::pi * u2);
}

template <class S>
void initialize(std::span<S> w, init_kind kind, index fan_in, index fan_out, generator& rng) {
  const bool xavier = kind == init_kind::xavier_uniform || kind == init_kind::xavier_normal;
  const index fan = xavier ? fan_in + fan_out : fan_in;
  if (kind != init_kind::zeros && fan <= 0) {
    throw usage_error(fmt::format(
        "ad::initialize: fan_in {} / fan_out {} give no scale; pass the layer's input (and, "
        "for Xavier, output) width",
        fan_in, fan_out));
  }
  const double var = 2.0 / static_cast<double>(fan);
  switch (kind) {
    case init_kind::kaiming_uniform:
    case init_kind::xavier_uniform: {
      const double bound = std::sqrt(3.0 * var);  // U(-b,b) has variance b^2/3
      for (S& x : w) x = static_cast<S>((2.0 * uniform01(rng) - 1.0) * bound);
      break;
    }
    case init_kind::kaiming_normal:
    case init_kind::xavier_normal: {
      const double sd = std::sqrt(var);
      for (S& x : w) x = static_cast<S>(normal01(rng) * sd);
      break;
    }
    case init_kind::zeros:
      for (S& x : w) x = S(0);
      break;
  }
}

template void initialize<float>(std::span<float>, init_kind, index, index, generator&);
template void initialize<double>(std::span<double>, init_kind, index, index, generator&);

}  // namespace ringflow::ad
