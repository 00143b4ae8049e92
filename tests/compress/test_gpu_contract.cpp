// The host side of the CPU/GPU bit-exactness contract of compress/kernels.hpp,
// checked without a GPU (tests/cuda checks the kernels themselves where one
// is present): the canonical summation order of the sign scale, and the
// formulations of the int8 quantizer and the random draws that the GPU
// kernels use, against the CPU's.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "ringflow/compress/kernels.hpp"
#include "support/catch.hpp"

namespace kn = ringflow::compress::kernels;

namespace {
bool same_bits(float a, float b) { return std::memcmp(&a, &b, sizeof a) == 0; }
}  // namespace

TEST_CASE("abs_sum_block sums in the lane order a warp butterfly reproduces",
          "[compress][kernels]") {
  for (std::size_t n : {1u, 31u, 32u, 33u, 70u, 256u, 1000u}) {
    std::vector<float> x(n);
    for (std::size_t i = 0; i < n; ++i) x[i] = (kn::uniform01(5, i) - 0.5f) * (1.0f + i % 7);
    // Lane l = i mod 32 sums its elements in order from +0; then a butterfly:
    // every lane adds its partner l ^ h, for h = 16 ... 1; lane 0's result.
    float lane[32] = {};
    for (std::size_t i = 0; i < n; ++i) lane[i % 32] += std::fabs(x[i]);
    for (unsigned h = 16; h > 0; h >>= 1) {
      float next[32];
      for (unsigned l = 0; l < 32; ++l) next[l] = lane[l] + lane[l ^ h];
      std::memcpy(lane, next, sizeof lane);
    }
    INFO("n = " << n);
    CHECK(same_bits(kn::abs_sum_block(x.data(), n), lane[0]));
    // The butterfly leaves the same bits in every lane (commutativity).
    for (unsigned l = 1; l < 32; ++l) CHECK(same_bits(lane[l], lane[0]));
  }
}

TEST_CASE("uniform01_state stepped by additions is uniform01", "[compress][kernels]") {
  const std::uint64_t key = kn::stream_key(3, 4, 5);
  std::uint64_t st = key + 1000 * kn::golden_gamma;
  for (std::uint64_t i = 1000; i < 200000; ++i, st += kn::golden_gamma) {
    const float a = kn::uniform01(key, i), b = kn::uniform01_state(st);
    // Bits 40..63 of splitmix64's full mix, the definition.
    const float c =
        static_cast<float>(kn::mix64(key + i * kn::golden_gamma) >> 40) * (1.0f / 16777216.0f);
    if (!same_bits(a, b) || !same_bits(a, c)) {
      FAIL("draw " << i << ": uniform01 " << a << ", uniform01_state " << b << ", mix64 " << c);
    }
  }
}

TEST_CASE("quantize_drawn (the GPU's form) gives the CPU quantizer's q", "[compress][kernels]") {
  const float specials[] = {0.0f,     -0.0f,     1.0f,       -1.0f,       0.5f,       -0.5f,
                            3.0f,     -3.0f,     126.99999f, -126.99999f, 1e-30f,     -1e-30f,
                            INFINITY, -INFINITY, NAN,        2.9999998f,  -2.9999998f};
  std::uint64_t n_checked = 0;
  for (int levels : {127, 63, 31, 7, 1}) {
    for (float scale : {1.0f, 3.0f, 0.37f, 1e-20f, 0.0f}) {
      const float inv = kn::int8_inv_step(scale, levels);
      const kn::quantize_int8 quant{inv, levels, kn::stream_key(9, levels, 1)};
      auto check = [&](float x, std::uint64_t i) {
        const float qf = quant.quantize_drawn(x, kn::uniform01(quant.key, i));
        const int q = quant(x, i);
        ++n_checked;
        if (qf != static_cast<float>(q) || std::floor(qf) != qf) {
          FAIL("x " << x << ", scale " << scale << ", levels " << levels << ", index " << i
                    << ": quantize_drawn " << qf << ", operator() " << q);
        }
      };
      for (std::uint64_t i = 0; i < 20000; ++i) {
        check((kn::uniform01(11, i) * 2.0f - 1.0f) * scale * 1.1f, i);
      }
      for (float x : specials) {
        for (std::uint64_t i = 0; i < 64; ++i) check(x * scale, i);
      }
    }
  }
  CHECK(n_checked > 400000);
}
