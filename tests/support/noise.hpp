// Deterministic pseudo-random floats in [-1, 1) for the trainer tests: the
// same (n, seed) gives the same values on every rank and run (xorshift64).
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace ringflow::testing {

inline std::vector<float> noise(std::size_t n, std::uint64_t seed) {
  std::vector<float> v(n);
  std::uint64_t x = seed * 0x9e3779b97f4a7c15ull + 1;
  for (auto& f : v) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    f = static_cast<float>(static_cast<double>(x >> 11) / 9007199254740992.0 * 2.0 - 1.0);
  }
  return v;
}

}  // namespace ringflow::testing
