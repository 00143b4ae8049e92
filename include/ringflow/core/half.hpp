// IEEE fp16 (`half`) and bfloat16: storage types with round-to-nearest-even
// conversion from float; arithmetic goes through float.
#pragma once

#include <bit>
#include <cstdint>
#include <cstring>

#include "ringflow/core/config.hpp"

namespace ringflow {
namespace detail {

RINGFLOW_HOST_DEVICE inline std::uint32_t float_bits(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

RINGFLOW_HOST_DEVICE inline float bits_float(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

/// float -> IEEE binary16 bits, round to nearest even; NaN stays NaN (quiet),
/// overflow goes to Inf, tiny values become subnormals or signed zero.
RINGFLOW_HOST_DEVICE inline std::uint16_t float_to_half_bits(float f) {
  const std::uint32_t x = float_bits(f);
  const std::uint32_t sign = (x >> 16) & 0x8000u;
  const std::uint32_t abs = x & 0x7fffffffu;
  if (abs >= 0x7f800000u) {  // Inf or NaN
    if (abs == 0x7f800000u) return static_cast<std::uint16_t>(sign | 0x7c00u);
    // Keep the top payload bits and force the quiet bit so NaN never becomes Inf.
    return static_cast<std::uint16_t>(sign | 0x7e00u | ((abs >> 13) & 0x03ffu));
  }
  if (abs >= 0x477ff000u) {  // rounds to >= 65520 -> Inf
    return static_cast<std::uint16_t>(sign | 0x7c00u);
  }
  if (abs < 0x38800000u) {  // below the smallest normal half (2^-14): subnormal
    if (abs < 0x33000000u) return static_cast<std::uint16_t>(sign);  // < 2^-25 -> 0
    // Subnormal: value = m * 2^-24; shift the full mantissa into place.
    const std::uint32_t exp = abs >> 23;
    const std::uint32_t mant = (abs & 0x007fffffu) | 0x00800000u;
    const std::uint32_t shift =
        126u - exp;  // value / 2^-24 = mant * 2^(exp - 126); shift in [14, 24]
    std::uint32_t h = mant >> shift;
    const std::uint32_t rem = mant & ((1u << shift) - 1u);
    const std::uint32_t halfway = 1u << (shift - 1u);
    if (rem > halfway || (rem == halfway && (h & 1u))) ++h;
    return static_cast<std::uint16_t>(sign | h);
  }
  // Normal: rebias exponent (127 -> 15) and round the 13 dropped bits.
  std::uint32_t h = ((abs - 0x38000000u) >> 13);
  const std::uint32_t rem = abs & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;  // may carry into exponent: correct
  return static_cast<std::uint16_t>(sign | h);
}

RINGFLOW_HOST_DEVICE inline float half_bits_to_float(std::uint16_t h) {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  const std::uint32_t exp = (h >> 10) & 0x1fu;
  const std::uint32_t mant = h & 0x03ffu;
  if (exp == 0x1fu) return bits_float(sign | 0x7f800000u | (mant << 13));  // Inf/NaN
  if (exp == 0) {
    if (mant == 0) return bits_float(sign);
    // Subnormal half: exact in float as mant * 2^-24.
    const float v = static_cast<float>(mant) * 5.9604644775390625e-08f;
    return sign ? -v : v;
  }
  return bits_float(sign | ((exp + 112u) << 23) | (mant << 13));
}

/// float -> bfloat16 bits, round to nearest even; NaN stays a quiet NaN.
RINGFLOW_HOST_DEVICE inline std::uint16_t float_to_bf16_bits(float f) {
  const std::uint32_t x = float_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) {
    return static_cast<std::uint16_t>((x >> 16) | 0x0040u);
  }
  const std::uint32_t lsb = (x >> 16) & 1u;
  return static_cast<std::uint16_t>((x + 0x7fffu + lsb) >> 16);  // overflow -> Inf: correct
}

RINGFLOW_HOST_DEVICE inline float bf16_bits_to_float(std::uint16_t b) {
  return bits_float(static_cast<std::uint32_t>(b) << 16);
}

}  // namespace detail

/// IEEE 754 binary16. Converting from float rounds to nearest even.
struct half {
  std::uint16_t bits = 0;

  half() = default;
  RINGFLOW_HOST_DEVICE explicit half(float f) : bits(detail::float_to_half_bits(f)) {}
  RINGFLOW_HOST_DEVICE explicit half(double d) : half(static_cast<float>(d)) {}
  RINGFLOW_HOST_DEVICE explicit half(int i) : half(static_cast<float>(i)) {}
  RINGFLOW_HOST_DEVICE operator float() const { return detail::half_bits_to_float(bits); }

  RINGFLOW_HOST_DEVICE static half from_bits(std::uint16_t b) {
    half h;
    h.bits = b;
    return h;
  }
  friend RINGFLOW_HOST_DEVICE bool operator==(half a, half b) { return float(a) == float(b); }
};

/// bfloat16: the top 16 bits of a float. Converting from float rounds to nearest even.
struct bfloat16 {
  std::uint16_t bits = 0;

  bfloat16() = default;
  RINGFLOW_HOST_DEVICE explicit bfloat16(float f) : bits(detail::float_to_bf16_bits(f)) {}
  RINGFLOW_HOST_DEVICE explicit bfloat16(double d) : bfloat16(static_cast<float>(d)) {}
  RINGFLOW_HOST_DEVICE explicit bfloat16(int i) : bfloat16(static_cast<float>(i)) {}
  RINGFLOW_HOST_DEVICE operator float() const { return detail::bf16_bits_to_float(bits); }

  RINGFLOW_HOST_DEVICE static bfloat16 from_bits(std::uint16_t b) {
    bfloat16 h;
    h.bits = b;
    return h;
  }
  friend RINGFLOW_HOST_DEVICE bool operator==(bfloat16 a, bfloat16 b) {
    return float(a) == float(b);
  }
};

static_assert(sizeof(half) == 2 && sizeof(bfloat16) == 2);

}  // namespace ringflow
