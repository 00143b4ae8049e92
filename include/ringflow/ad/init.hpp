// Seeded, portable random numbers and weight initializers (Kaiming, Xavier).
//
// Only std::mt19937_64 comes from the standard library (its output is fixed by
// the standard); the uniform and normal transforms are ours, so a seed gives
// the same weights with libstdc++, libc++ and MSVC.
#pragma once

#include <cstdint>
#include <random>
#include <span>

#include "ringflow/ad/shape.hpp"

namespace ringflow::ad {

using generator = std::mt19937_64;

/// Uniform in [0, 1) from the top 53 bits of one draw.
double uniform01(generator& rng);
/// Standard normal (Box-Muller; one draw pair per value).
double normal01(generator& rng);

/// How a layer's weight is initialized.
enum class init_kind {
  kaiming_uniform,  ///< U(-b, b), b = sqrt(6 / fan_in)          (ReLU gain sqrt 2)
  kaiming_normal,   ///< N(0, 2 / fan_in)
  xavier_uniform,   ///< U(-b, b), b = sqrt(6 / (fan_in + fan_out))
  xavier_normal,    ///< N(0, 2 / (fan_in + fan_out))
  zeros,
};

/// Fills `w` (a [fan_in, fan_out] weight) as `kind` says, drawing from `rng`.
template <class S>
void initialize(std::span<S> w, init_kind kind, index fan_in, index fan_out, generator& rng);

template <class S>
void kaiming_uniform(std::span<S> w, index fan_in, generator& rng) {
  initialize(w, init_kind::kaiming_uniform, fan_in, 0, rng);
}
template <class S>
void kaiming_normal(std::span<S> w, index fan_in, generator& rng) {
  initialize(w, init_kind::kaiming_normal, fan_in, 0, rng);
}
template <class S>
void xavier_uniform(std::span<S> w, index fan_in, index fan_out, generator& rng) {
  initialize(w, init_kind::xavier_uniform, fan_in, fan_out, rng);
}
template <class S>
void xavier_normal(std::span<S> w, index fan_in, index fan_out, generator& rng) {
  initialize(w, init_kind::xavier_normal, fan_in, fan_out, rng);
}

extern template void initialize<float>(std::span<float>, init_kind, index, index, generator&);
extern template void initialize<double>(std::span<double>, init_kind, index, index, generator&);

}  // namespace ringflow::ad
