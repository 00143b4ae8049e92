// The batch fp16 conversion (F16C or portable) gives the bits of core/half.hpp's
// per-element conversions for every input: all 65536 halves on decode, and on
// encode every half's value, its neighbours, every rounding midpoint and its
// neighbours, every NaN payload, and random floats. "[exhaustive]" (hidden,
// ~1 min) checks all 2^32 floats.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "ringflow/compress/half_codec.hpp"
#include "ringflow/compress/kernels.hpp"
#include "ringflow/core/error.hpp"
#include "ringflow/core/half.hpp"
#include "support/catch.hpp"

using namespace ringflow;
using namespace ringflow::compress;

namespace {
float from_bits(std::uint32_t u) { return detail::bits_float(u); }

std::vector<fp16_path> paths() {
  std::vector<fp16_path> p{fp16_path::portable};
  if (best_fp16_path() == fp16_path::f16c) p.push_back(fp16_path::f16c);
  return p;
}

// Encodes `x` through `path` (at an odd offset, so the vector loop runs
// unaligned and the tail is exercised) and returns the first mismatch with
// float_to_half_bits, or -1.
long first_encode_mismatch(const std::vector<float>& x, fp16_path path) {
  std::vector<float> in(x.size() + 1);
  std::copy(x.begin(), x.end(), in.begin() + 1);
  std::vector<std::uint16_t> out(x.size() + 1);
  encode_fp16(std::span<const float>(in).subspan(1), std::span<std::uint16_t>(out).subspan(1),
              path);
  for (std::size_t i = 0; i < x.size(); ++i) {
    if (out[i + 1] != detail::float_to_half_bits(x[i])) return static_cast<long>(i);
  }
  return -1;
}
}  // namespace

TEST_CASE("fp16 batch decode is bit-identical to half_bits_to_float for all 65536 halves",
          "[compress][fp16]") {
  std::vector<std::uint16_t> h(65536);
  for (std::uint32_t i = 0; i < 65536; ++i) h[i] = static_cast<std::uint16_t>(i);
  for (const fp16_path path : paths()) {
    INFO(to_string(path));
    std::vector<float> out(h.size());
    decode_fp16(h, out, false, path);
    std::vector<float> acc(h.size(), 1.5f);
    decode_fp16(h, acc, true, path);
    for (std::uint32_t i = 0; i < 65536; ++i) {
      const float want = detail::half_bits_to_float(static_cast<std::uint16_t>(i));
      const float want_acc = 1.5f + want;
      INFO("half bits 0x" << std::hex << i);
      REQUIRE(detail::float_bits(out[i]) == detail::float_bits(want));
      REQUIRE(detail::float_bits(acc[i]) == detail::float_bits(want_acc));
    }
    // Lengths around the vector width, unaligned.
    for (std::size_t n = 0; n <= 19; ++n) {
      std::vector<float> o(n + 1, 2.0f);
      decode_fp16(std::span<const std::uint16_t>(h).subspan(0x7bf0, n),
                  std::span<float>(o).subspan(1), false, path);
      for (std::size_t i = 0; i < n; ++i) {
        // Crosses the largest finite half into Inf and NaN: compare bits.
        REQUIRE(detail::float_bits(o[i + 1]) == detail::float_bits(detail::half_bits_to_float(
                                                    static_cast<std::uint16_t>(0x7bf0 + i))));
      }
      REQUIRE(o[0] == 2.0f);
    }
  }
}

TEST_CASE("fp16 batch encode is bit-identical to float_to_half_bits at every rounding boundary",
          "[compress][fp16]") {
  std::vector<float> x;
  const auto around = [&](float v) {
    std::uint32_t u = detail::float_bits(v);
    for (std::uint32_t d = 0; d <= 3; ++d) {
      x.push_back(from_bits(u + d));
      x.push_back(from_bits(u - d));
    }
  };
  // Every half value and every midpoint between neighbours (where round to
  // nearest even decides), each with a few float ulps either side, both signs.
  for (std::uint32_t h = 0; h < 0x7c00; ++h) {
    const double v = detail::half_bits_to_float(static_cast<std::uint16_t>(h));
    const double next = h + 1 < 0x7c00
                            ? detail::half_bits_to_float(static_cast<std::uint16_t>(h + 1))
                            : 65536.0;  // the first value that would be 2^16
    for (const float s : {1.0f, -1.0f}) {
      around(s * static_cast<float>(v));
      around(s * static_cast<float>((v + next) / 2));  // exact in float
    }
  }
  for (const float v :
       {0.0f, -0.0f, 65504.0f, 65519.996f, 65520.0f, 65536.0f, std::numeric_limits<float>::max(),
        std::numeric_limits<float>::min(), std::numeric_limits<float>::denorm_min(),
        std::ldexp(1.0f, -25), std::ldexp(1.0f, -24), std::ldexp(1.0f, -14), 1e-30f}) {
    around(v);
    around(-v);
  }
  x.push_back(std::numeric_limits<float>::infinity());
  x.push_back(-std::numeric_limits<float>::infinity());
  // Random bit patterns (every exponent, NaNs included).
  const std::uint64_t key = kernels::stream_key(99, 1, 2);
  for (std::uint64_t i = 0; i < (1u << 20); ++i) {
    x.push_back(from_bits(static_cast<std::uint32_t>(kernels::mix64(key + i))));
  }
  for (const fp16_path path : paths()) {
    INFO(to_string(path) << ", " << x.size() << " inputs");
    const long bad = first_encode_mismatch(x, path);
    if (bad >= 0)
      INFO("first mismatch: float bits 0x" << std::hex
                                           << detail::float_bits(x[static_cast<std::size_t>(bad)]));
    REQUIRE(bad == -1);
  }
}

TEST_CASE("fp16 batch encode keeps every NaN payload like float_to_half_bits", "[compress][fp16]") {
  // All 2^24 floats with an all-ones exponent (both signs): Inf, quiet and
  // signalling NaNs with every payload.
  std::vector<float> x(1u << 20);
  for (const fp16_path path : paths()) {
    INFO(to_string(path));
    for (std::uint32_t chunk = 0; chunk < 16; ++chunk) {
      for (std::uint32_t i = 0; i < x.size(); ++i) {
        const std::uint32_t sign = chunk >= 8 ? 0x80000000u : 0u;
        x[i] = from_bits(sign | 0x7f800000u | (chunk & 7u) << 20 | i);
      }
      REQUIRE(first_encode_mismatch(x, path) == -1);
    }
  }
}

TEST_CASE("fp16 batch conversion rejects mismatched sizes and an absent F16C", "[compress][fp16]") {
  std::vector<float> f(4);
  std::vector<std::uint16_t> h(5);
  REQUIRE_THROWS_AS(encode_fp16(f, h), usage_error);
  REQUIRE_THROWS_AS(decode_fp16(h, f), usage_error);
  if (best_fp16_path() != fp16_path::f16c) {
    REQUIRE_THROWS_AS(encode_fp16(f, std::span<std::uint16_t>(h).first(4), fp16_path::f16c),
                      not_supported_error);
  }
}

TEST_CASE("fp16 batch encode equals float_to_half_bits for all 2^32 floats",
          "[.][exhaustive][compress][fp16]") {
  if (best_fp16_path() != fp16_path::f16c) {
    WARN("no F16C on this CPU: only the portable path exists, nothing to compare");
    return;
  }
  std::vector<float> x(1u << 22);
  std::vector<std::uint16_t> out(x.size());
  std::uint64_t bad = 0;
  for (std::uint64_t base = 0; base < (std::uint64_t{1} << 32); base += x.size()) {
    for (std::size_t i = 0; i < x.size(); ++i)
      x[i] = from_bits(static_cast<std::uint32_t>(base + i));
    encode_fp16(x, out, fp16_path::f16c);
    for (std::size_t i = 0; i < x.size(); ++i) bad += out[i] != detail::float_to_half_bits(x[i]);
  }
  REQUIRE(bad == 0);
}
