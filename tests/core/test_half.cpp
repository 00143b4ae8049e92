// half and bfloat16: rounding, edge values, exhaustive round trips.
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>

#include "ringflow/core/half.hpp"
#include "support/catch.hpp"

using ringflow::bfloat16;
using ringflow::half;

namespace {
float from_bits(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
}  // namespace

TEST_CASE("half converts edge values", "[core][half]") {
  CHECK(half(0.0f).bits == 0x0000);
  CHECK(half(-0.0f).bits == 0x8000);
  CHECK(half(1.0f).bits == 0x3c00);
  CHECK(half(-2.0f).bits == 0xc000);
  CHECK(half(65504.0f).bits == 0x7bff);  // largest finite
  CHECK(half(65519.0f).bits == 0x7bff);  // rounds down
  CHECK(half(65520.0f).bits == 0x7c00);  // tie rounds to even = Inf
  CHECK(half(std::numeric_limits<float>::infinity()).bits == 0x7c00);
  CHECK(half(-std::numeric_limits<float>::infinity()).bits == 0xfc00);
  CHECK(half(std::ldexp(1.0f, -14)).bits == 0x0400);         // smallest normal
  CHECK(half(std::ldexp(1.0f, -24)).bits == 0x0001);         // smallest subnormal
  CHECK(half(std::ldexp(1.0f, -25)).bits == 0x0000);         // tie to even -> 0
  CHECK(half(std::ldexp(3.0f, -26)).bits == 0x0001);         // 0.75 ulp -> 1 ulp
  CHECK(half(std::ldexp(3.0f, -25)).bits == 0x0002);         // 1.5 ulp tie -> even (2)
  CHECK(half(1.0f + std::ldexp(1.0f, -11)).bits == 0x3c00);  // tie -> even (1.0)
  CHECK(half(1.0f + std::ldexp(3.0f, -11)).bits == 0x3c02);  // tie -> even (1+2^-9)
  const half nan(std::numeric_limits<float>::quiet_NaN());
  CHECK(std::isnan(static_cast<float>(nan)));
  CHECK((nan.bits & 0x7c00) == 0x7c00);
  CHECK((nan.bits & 0x03ff) != 0);
  // A signalling NaN whose payload lives only in the low bits must stay NaN.
  CHECK(std::isnan(static_cast<float>(half(from_bits(0x7f800001u)))));
  CHECK(std::isnan(static_cast<float>(bfloat16(from_bits(0x7f800001u)))));
}

TEST_CASE("every half bit pattern survives half -> float -> half", "[core][half]") {
  for (std::uint32_t b = 0; b < 0x10000u; ++b) {
    const half h = half::from_bits(static_cast<std::uint16_t>(b));
    const float f = static_cast<float>(h);
    const half back(f);
    if (std::isnan(f)) {
      REQUIRE(std::isnan(static_cast<float>(back)));
    } else {
      REQUIRE(back.bits == h.bits);
    }
  }
}

TEST_CASE("every bfloat16 bit pattern survives bf16 -> float -> bf16", "[core][bf16]") {
  for (std::uint32_t b = 0; b < 0x10000u; ++b) {
    const bfloat16 h = bfloat16::from_bits(static_cast<std::uint16_t>(b));
    const float f = static_cast<float>(h);
    const bfloat16 back(f);
    if (std::isnan(f)) {
      REQUIRE(std::isnan(static_cast<float>(back)));
    } else {
      REQUIRE(back.bits == h.bits);
    }
  }
}

TEST_CASE("bfloat16 rounds to nearest even", "[core][bf16]") {
  CHECK(bfloat16(1.0f).bits == 0x3f80);
  CHECK(bfloat16(from_bits(0x3f808000u)).bits == 0x3f80);  // tie -> even
  CHECK(bfloat16(from_bits(0x3f818000u)).bits == 0x3f82);  // tie -> even (up)
  CHECK(bfloat16(from_bits(0x3f808001u)).bits == 0x3f81);  // above tie -> up
  CHECK(bfloat16(from_bits(0x7f7fffffu)).bits == 0x7f80);  // max float rounds to Inf
  CHECK(bfloat16(-std::numeric_limits<float>::infinity()).bits == 0xff80);
  CHECK(bfloat16(-0.0f).bits == 0x8000);
}

TEST_CASE("half conversion matches correct rounding on random floats", "[core][half]") {
  // Reference: round to the nearest representable half by comparing the two
  // neighbours in double (exact), ties to the even bit pattern.
  std::mt19937 gen(42);
  for (int i = 0; i < 200000; ++i) {
    const std::uint32_t bits = gen();
    const float f = from_bits(bits);
    if (std::isnan(f) || std::isinf(f)) continue;
    const half h(f);
    const float hv = static_cast<float>(h);
    if (std::fabs(f) >= 65520.0f) {
      REQUIRE(std::isinf(hv));
      continue;
    }
    // neighbours of h towards f
    const std::uint16_t mag = h.bits & 0x7fff;
    const double err = std::fabs(static_cast<double>(hv) - static_cast<double>(f));
    for (int d : {-1, 1}) {
      const int m = static_cast<int>(mag) + d;
      if (m < 0 || m > 0x7bff) continue;
      const half n = half::from_bits(static_cast<std::uint16_t>((h.bits & 0x8000) | m));
      const double nerr =
          std::fabs(static_cast<double>(static_cast<float>(n)) - static_cast<double>(f));
      REQUIRE(err <= nerr);
      if (err == nerr) REQUIRE((mag & 1) == 0);
    }
  }
}
