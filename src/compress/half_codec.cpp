// Batch fp16 conversion: F16C with a run-time CPU check, else the portable
// functors. Both give the bits of core/half.hpp's conversions for every input
// (tests/compress/test_half_codec.cpp checks all 65536 halves and the
// rounding boundaries of every one of them).
#include "ringflow/compress/half_codec.hpp"

#include <fmt/format.h>

#include "ringflow/core/error.hpp"
#include "ringflow/core/half.hpp"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define RINGFLOW_F16C_PATH 1
#include <immintrin.h>
#endif

namespace ringflow::compress {

namespace {

void encode_portable(const float* in, std::uint16_t* out, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) out[i] = detail::float_to_half_bits(in[i]);
}

void decode_portable(const std::uint16_t* in, float* out, std::size_t n, bool add) {
  if (add) {
    for (std::size_t i = 0; i < n; ++i) out[i] += detail::half_bits_to_float(in[i]);
  } else {
    for (std::size_t i = 0; i < n; ++i) out[i] = detail::half_bits_to_float(in[i]);
  }
}

#ifdef RINGFLOW_F16C_PATH
bool cpu_has_f16c() noexcept {
  __builtin_cpu_init();
  return __builtin_cpu_supports("f16c") && __builtin_cpu_supports("avx2");
}

// VCVTPS2PH rounds to nearest even with the immediate (MXCSR's mode is not
// used), makes subnormals (FTZ does not apply to it), sends overflow to Inf,
// and turns NaN into sign | 0x7e00 | top payload bits: exactly
// float_to_half_bits. The tail (< 8 elements) goes through the functor.
__attribute__((target("f16c,avx2"))) void encode_f16c(const float* in, std::uint16_t* out,
                                                      std::size_t n) {
  std::size_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m128i a = _mm256_cvtps_ph(_mm256_loadu_ps(in + i), _MM_FROUND_TO_NEAREST_INT);
    const __m128i b = _mm256_cvtps_ph(_mm256_loadu_ps(in + i + 8), _MM_FROUND_TO_NEAREST_INT);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), a);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i + 8), b);
  }
  for (; i + 8 <= n; i += 8) {
    const __m128i a = _mm256_cvtps_ph(_mm256_loadu_ps(in + i), _MM_FROUND_TO_NEAREST_INT);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), a);
  }
  // Clean upper ymm halves before any SSE code runs: GCC 12 omits the
  // vzeroupper before a tail call, and a dirty upper state made every later
  // SSE loop of the process slower (int8 encode 1.3 -> 0.4 GB/s, measured).
  _mm256_zeroupper();
  encode_portable(in + i, out + i, n - i);
}

// VCVTPH2PS is exact, but quiets a signalling NaN (sets bit 22), where
// half_bits_to_float keeps the payload as it is. The lanes with an all-ones
// exponent (Inf and NaN) are therefore rebuilt with integer ops:
// sign << 16 | 0x7f800000 | mantissa << 13.
__attribute__((target("f16c,avx2"))) inline __m256 decode8(__m128i h) {
  const __m256 f = _mm256_cvtph_ps(h);
  const __m256i w = _mm256_cvtepu16_epi32(h);
  const __m256i exp_mask = _mm256_set1_epi32(0x7c00);
  const __m256i special = _mm256_cmpeq_epi32(_mm256_and_si256(w, exp_mask), exp_mask);
  const __m256i bits = _mm256_or_si256(
      _mm256_or_si256(_mm256_slli_epi32(_mm256_and_si256(w, _mm256_set1_epi32(0x8000)), 16),
                      _mm256_set1_epi32(0x7f800000)),
      _mm256_slli_epi32(_mm256_and_si256(w, _mm256_set1_epi32(0x03ff)), 13));
  return _mm256_blendv_ps(f, _mm256_castsi256_ps(bits), _mm256_castsi256_ps(special));
}

__attribute__((target("f16c,avx2"))) void decode_f16c(const std::uint16_t* in, float* out,
                                                      std::size_t n, bool add) {
  std::size_t i = 0;
  if (add) {
    for (; i + 8 <= n; i += 8) {
      const __m256 f = decode8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i)));
      _mm256_storeu_ps(out + i, _mm256_add_ps(_mm256_loadu_ps(out + i), f));
    }
  } else {
    for (; i + 8 <= n; i += 8) {
      _mm256_storeu_ps(out + i, decode8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i))));
    }
  }
  _mm256_zeroupper();  // see encode_f16c
  decode_portable(in + i, out + i, n - i, add);
}
#else
bool cpu_has_f16c() noexcept { return false; }
#endif

void require_f16c() {
  if (best_fp16_path() != fp16_path::f16c) {
    throw not_supported_error(
        "fp16 conversion: the f16c path needs an x86-64 CPU with F16C and AVX2; this one has "
        "none (use fp16_path::portable or best_fp16_path())");
  }
}
}  // namespace

fp16_path best_fp16_path() noexcept {
  static const fp16_path best = cpu_has_f16c() ? fp16_path::f16c : fp16_path::portable;
  return best;
}

const char* to_string(fp16_path path) noexcept {
  return path == fp16_path::f16c ? "f16c" : "portable";
}

void encode_fp16(std::span<const float> in, std::span<std::uint16_t> out, fp16_path path) {
  if (in.size() != out.size()) {
    throw usage_error(
        fmt::format("encode_fp16: {} inputs but room for {} outputs; the sizes must match",
                    in.size(), out.size()));
  }
  if (path == fp16_path::f16c) {
    require_f16c();
#ifdef RINGFLOW_F16C_PATH
    encode_f16c(in.data(), out.data(), in.size());
    return;
#endif
  }
  encode_portable(in.data(), out.data(), in.size());
}

void decode_fp16(std::span<const std::uint16_t> in, std::span<float> out, bool add,
                 fp16_path path) {
  if (in.size() != out.size()) {
    throw usage_error(
        fmt::format("decode_fp16: {} inputs but room for {} outputs; the sizes must match",
                    in.size(), out.size()));
  }
  if (path == fp16_path::f16c) {
    require_f16c();
#ifdef RINGFLOW_F16C_PATH
    decode_f16c(in.data(), out.data(), in.size(), add);
    return;
#endif
  }
  decode_portable(in.data(), out.data(), in.size(), add);
}

}  // namespace ringflow::compress
