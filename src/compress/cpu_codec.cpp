// Batch CPU codec loops: baseline C++, and AVX2 / AVX-512 clones picked at run
// time, each bit-identical to the kernels.hpp functor it loops over
// (tests/compress/test_cpu_codec.cpp compares every path with the functors).
//
// Why each vector loop gives the functor's bits:
// - int8: x * inv_step is one IEEE multiply (never fused: no FMA target, and
//   this file is compiled with -ffp-contract=off); NaN lanes become +0 and the
//   rest are clamped to [-L, L] before the floor, which yields exactly the
//   functor's early returns (a clamped lane has frac 0, so no random step);
//   floor and v - floor are exact for |v| <= 127; the draw is mix64 of the
//   same 64-bit state, bits 40..63, converted exactly (< 2^24) and scaled by
//   2^-24 (exact).
// - bf16: the functor's integer rounding, lane-wise.
// - sign: movemask is sign_bit; the block sum keeps the canonical 32 lanes.
#include "ringflow/compress/cpu_codec.hpp"

#include <fmt/format.h>

#include <cstdlib>
#include <cstring>
#include <string_view>

#include "ringflow/core/env.hpp"
#include "ringflow/core/error.hpp"
#include "ringflow/core/half.hpp"
#include "ringflow/core/log.hpp"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define RINGFLOW_X86_CODECS 1
// GCC 12's AVX-512 headers trip -Wmaybe-uninitialized on their own
// _mm512_undefined_*() placeholders (a known false positive).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#endif

namespace ringflow::compress {

namespace {

using kernels::golden_gamma;

// ---------------------------------------------------------------------------
// Baseline loops: the functors, element by element.

float absmax_baseline(const float* __restrict x, std::size_t n) {
  std::uint32_t m = 0;
  for (std::size_t i = 0; i < n; ++i) {
    const std::uint32_t a = kernels::magnitude_key(x[i]);
    m = a > m ? a : m;
  }
  return detail::bits_float(m);
}

void quantize_baseline(const float* __restrict x, std::int8_t* __restrict q, std::size_t n,
                       std::uint64_t first, const kernels::quantize_int8& quant) {
  for (std::size_t i = 0; i < n; ++i) q[i] = quant(x[i], first + i);
}

void dequantize_baseline(const std::int8_t* __restrict q, float* __restrict out, std::size_t n,
                         float step, bool add) {
  const kernels::dequantize_int8 deq{step};
  if (add) {
    for (std::size_t i = 0; i < n; ++i) out[i] += deq(q[i]);
  } else {
    for (std::size_t i = 0; i < n; ++i) out[i] = deq(q[i]);
  }
}

void encode_bf16_baseline(const float* __restrict in, std::uint16_t* __restrict out,
                          std::size_t n) {
  const kernels::encode_bf16 enc;
  for (std::size_t i = 0; i < n; ++i) out[i] = enc(in[i]);
}

void decode_bf16_baseline(const std::uint16_t* __restrict in, float* __restrict out, std::size_t n,
                          bool add) {
  const kernels::decode_bf16 dec;
  if (add) {
    for (std::size_t i = 0; i < n; ++i) out[i] += dec(in[i]);
  } else {
    for (std::size_t i = 0; i < n; ++i) out[i] = dec(in[i]);
  }
}

void pack_signs_baseline(const float* __restrict x, std::uint32_t* __restrict words,
                         std::size_t n) {
  for (std::size_t w = 0; 32 * w < n; ++w) {
    const std::size_t lo = 32 * w;
    words[w] = kernels::pack_signs(x + lo, static_cast<unsigned>(n - lo < 32 ? n - lo : 32));
  }
}

void unpack_signs_add_baseline(const std::uint32_t* __restrict words, float* __restrict out,
                               std::size_t n, float scale) {
  for (std::size_t w = 0; 32 * w < n; ++w) {
    const std::uint32_t word = words[w];
    float* o = out + 32 * w;
    const auto bits = static_cast<unsigned>(n - 32 * w < 32 ? n - 32 * w : 32);
    for (unsigned j = 0; j < bits; ++j) o[j] += kernels::unpack_sign(word, j, scale);
  }
}

void add_baseline(const float* __restrict in, float* __restrict out, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) out[i] += in[i];
}

#ifdef RINGFLOW_X86_CODECS
// ---------------------------------------------------------------------------
// AVX2. Every function handles a multiple of its block and returns how many
// elements it did; the caller finishes the rest with the baseline loop.
// _mm256_zeroupper() before returning: GCC 12 can leave the upper ymm halves
// dirty before a tail call, which slows every later SSE loop of the process
// (see half_codec.cpp).

#define RINGFLOW_AVX2 __attribute__((target("avx2")))

RINGFLOW_AVX2 std::size_t absmax_avx2(const float* x, std::size_t n, std::uint32_t& m) {
  const __m256i mask = _mm256_set1_epi32(0x7fffffff);
  __m256i a = _mm256_setzero_si256(), b = _mm256_setzero_si256();
  std::size_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256i u = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i));
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i + 8));
    a = _mm256_max_epu32(a, _mm256_and_si256(u, mask));
    b = _mm256_max_epu32(b, _mm256_and_si256(v, mask));
  }
  a = _mm256_max_epu32(a, b);
  __m128i c = _mm_max_epu32(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
  c = _mm_max_epu32(c, _mm_shuffle_epi32(c, 0x4e));
  c = _mm_max_epu32(c, _mm_shuffle_epi32(c, 0xb1));
  m = static_cast<std::uint32_t>(_mm_cvtsi128_si32(c));
  _mm256_zeroupper();
  return i;
}

// a * c mod 2^64 per 64-bit lane, from three 32 x 32 -> 64 multiplies
// (AVX2 has no 64-bit mullo): lo(a)lo(c) + (hi(a)lo(c) + lo(a)hi(c)) << 32.
// hi(a) is brought down with a shuffle (port 5) rather than a shift: the
// multiplies and shifts share ports 0 and 1, which bound this loop.
RINGFLOW_AVX2 inline __m256i mul64_avx2(__m256i a, __m256i c_lo, __m256i c_hi) {
  const __m256i ll = _mm256_mul_epu32(a, c_lo);
  const __m256i hl = _mm256_mul_epu32(_mm256_shuffle_epi32(a, 0xb1), c_lo);
  const __m256i lh = _mm256_mul_epu32(a, c_hi);
  return _mm256_add_epi64(ll, _mm256_slli_epi64(_mm256_add_epi64(hl, lh), 32));
}

// mix64's state after its two multiplies, for the 4 states in `x` (already
// + gamma); uniform01_state keeps bits 40..63.
RINGFLOW_AVX2 inline __m256i mixed_avx2(__m256i x) {
  const __m256i c1_lo = _mm256_set1_epi64x(0x1ce4e5b9ll), c1_hi = _mm256_set1_epi64x(0xbf58476dll);
  const __m256i c2_lo = _mm256_set1_epi64x(0x133111ebll), c2_hi = _mm256_set1_epi64x(0x94d049bbll);
  x = _mm256_xor_si256(x, _mm256_srli_epi64(x, 30));
  x = mul64_avx2(x, c1_lo, c1_hi);
  x = _mm256_xor_si256(x, _mm256_srli_epi64(x, 27));
  return mul64_avx2(x, c2_lo, c2_hi);
}

RINGFLOW_AVX2 std::size_t quantize_avx2(const float* x, std::int8_t* q, std::size_t n,
                                        std::uint64_t first, const kernels::quantize_int8& quant) {
  // Element j draws from state key + j*gamma, and uniform01_state adds one
  // more gamma first. Even elements of a group of 8 live in `ev`, odd ones in
  // `od`, so that ev | od << 32 gives the 8 draws as 32-bit lanes in order.
  const std::uint64_t s0 = quant.key + (first + 1) * golden_gamma;
  __m256i ev = _mm256_set_epi64x(
      static_cast<long long>(s0 + 6 * golden_gamma), static_cast<long long>(s0 + 4 * golden_gamma),
      static_cast<long long>(s0 + 2 * golden_gamma), static_cast<long long>(s0));
  __m256i od = _mm256_add_epi64(ev, _mm256_set1_epi64x(static_cast<long long>(golden_gamma)));
  const __m256i step8 = _mm256_set1_epi64x(static_cast<long long>(8 * golden_gamma));
  const __m256 inv = _mm256_set1_ps(quant.inv_step);
  const __m256 lim = _mm256_set1_ps(static_cast<float>(quant.levels));
  const __m256 nlim = _mm256_set1_ps(-static_cast<float>(quant.levels));
  const __m256 scale24 = _mm256_set1_ps(1.0f / 16777216.0f);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  std::size_t i = 0;
  for (; i + 32 <= n; i += 32) {
    __m256i qi[4];
    for (int k = 0; k < 4; ++k) {
      // Bits 40..63 of each state: the high dwords (odd elements in place,
      // even ones swapped down), then a 32-bit shift by 8.
      const __m256i hi =
          _mm256_blend_epi32(_mm256_shuffle_epi32(mixed_avx2(ev), 0xb1), mixed_avx2(od), 0xaa);
      const __m256i r = _mm256_srli_epi32(hi, 8);
      ev = _mm256_add_epi64(ev, step8);
      od = _mm256_add_epi64(od, step8);
      const __m256 u = _mm256_mul_ps(_mm256_cvtepi32_ps(r), scale24);
      __m256 v = _mm256_mul_ps(_mm256_loadu_ps(x + i + 8 * k), inv);
      v = _mm256_and_ps(v, _mm256_cmp_ps(v, v, _CMP_ORD_Q));  // NaN -> +0
      v = _mm256_min_ps(_mm256_max_ps(v, nlim), lim);
      const __m256 f = _mm256_floor_ps(v);
      const __m256 up = _mm256_cmp_ps(u, _mm256_sub_ps(v, f), _CMP_LT_OQ);
      // up is all ones (-1) where the draw rounds up.
      qi[k] = _mm256_sub_epi32(_mm256_cvttps_epi32(f), _mm256_castps_si256(up));
    }
    const __m256i w16a = _mm256_packs_epi32(qi[0], qi[1]);
    const __m256i w16b = _mm256_packs_epi32(qi[2], qi[3]);
    const __m256i w8 = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(w16a, w16b), order);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + i), w8);
  }
  _mm256_zeroupper();
  return i;
}

RINGFLOW_AVX2 std::size_t dequantize_avx2(const std::int8_t* q, float* out, std::size_t n,
                                          float step, bool add) {
  const __m256 s = _mm256_set1_ps(step);
  std::size_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + i));
    const __m256 a0 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)), s);
    const __m256 a1 =
        _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8))), s);
    if (add) {
      _mm256_storeu_ps(out + i, _mm256_add_ps(_mm256_loadu_ps(out + i), a0));
      _mm256_storeu_ps(out + i + 8, _mm256_add_ps(_mm256_loadu_ps(out + i + 8), a1));
    } else {
      _mm256_storeu_ps(out + i, a0);
      _mm256_storeu_ps(out + i + 8, a1);
    }
  }
  _mm256_zeroupper();
  return i;
}

RINGFLOW_AVX2 inline __m256i bf16_round_avx2(__m256i x) {
  const __m256i abs = _mm256_and_si256(x, _mm256_set1_epi32(0x7fffffff));
  const __m256i nan = _mm256_cmpgt_epi32(abs, _mm256_set1_epi32(0x7f800000));
  const __m256i hi = _mm256_srli_epi32(x, 16);
  const __m256i lsb = _mm256_and_si256(hi, _mm256_set1_epi32(1));
  const __m256i rounded =
      _mm256_srli_epi32(_mm256_add_epi32(x, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
  const __m256i quiet = _mm256_or_si256(hi, _mm256_set1_epi32(0x0040));
  return _mm256_blendv_epi8(rounded, quiet, nan);
}

RINGFLOW_AVX2 std::size_t encode_bf16_avx2(const float* in, std::uint16_t* out, std::size_t n) {
  std::size_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256i a = bf16_round_avx2(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(in + i)));
    const __m256i b =
        bf16_round_avx2(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(in + i + 8)));
    // Lanes are < 2^16, so the unsigned saturating pack is exact; it packs
    // per 128-bit half, and the permute puts the quarters back in order.
    const __m256i p = _mm256_permute4x64_epi64(_mm256_packus_epi32(a, b), 0xd8);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), p);
  }
  _mm256_zeroupper();
  return i;
}

RINGFLOW_AVX2 std::size_t decode_bf16_avx2(const std::uint16_t* in, float* out, std::size_t n,
                                           bool add) {
  std::size_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(in + i));
    const __m256 a = _mm256_castsi256_ps(
        _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(h)), 16));
    const __m256 b = _mm256_castsi256_ps(
        _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_extracti128_si256(h, 1)), 16));
    if (add) {
      _mm256_storeu_ps(out + i, _mm256_add_ps(_mm256_loadu_ps(out + i), a));
      _mm256_storeu_ps(out + i + 8, _mm256_add_ps(_mm256_loadu_ps(out + i + 8), b));
    } else {
      _mm256_storeu_ps(out + i, a);
      _mm256_storeu_ps(out + i + 8, b);
    }
  }
  _mm256_zeroupper();
  return i;
}

// The 32 canonical lanes are four vectors of 8; `lane` receives them.
RINGFLOW_AVX2 std::size_t abs_sum_avx2(const float* x, std::size_t n, float* lane) {
  const __m256 mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  std::size_t i = 0;
  for (; i + 32 <= n; i += 32) {
    a0 = _mm256_add_ps(a0, _mm256_and_ps(_mm256_loadu_ps(x + i), mask));
    a1 = _mm256_add_ps(a1, _mm256_and_ps(_mm256_loadu_ps(x + i + 8), mask));
    a2 = _mm256_add_ps(a2, _mm256_and_ps(_mm256_loadu_ps(x + i + 16), mask));
    a3 = _mm256_add_ps(a3, _mm256_and_ps(_mm256_loadu_ps(x + i + 24), mask));
  }
  _mm256_storeu_ps(lane, a0);
  _mm256_storeu_ps(lane + 8, a1);
  _mm256_storeu_ps(lane + 16, a2);
  _mm256_storeu_ps(lane + 24, a3);
  _mm256_zeroupper();
  return i;
}

RINGFLOW_AVX2 std::size_t pack_signs_avx2(const float* x, std::uint32_t* words, std::size_t n) {
  std::size_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const auto m0 = static_cast<std::uint32_t>(_mm256_movemask_ps(_mm256_loadu_ps(x + i)));
    const auto m1 = static_cast<std::uint32_t>(_mm256_movemask_ps(_mm256_loadu_ps(x + i + 8)));
    const auto m2 = static_cast<std::uint32_t>(_mm256_movemask_ps(_mm256_loadu_ps(x + i + 16)));
    const auto m3 = static_cast<std::uint32_t>(_mm256_movemask_ps(_mm256_loadu_ps(x + i + 24)));
    words[i / 32] = m0 | m1 << 8 | m2 << 16 | m3 << 24;
  }
  _mm256_zeroupper();
  return i;
}

// Lanes of +scale / -scale: the word's bit moved to bit 31 (by `sh`) becomes the sign.
RINGFLOW_AVX2 inline __m256 signed_scale_avx2(__m256i word, __m256i sh, __m256i s) {
  const __m256i top = _mm256_set1_epi32(static_cast<int>(0x80000000u));
  return _mm256_castsi256_ps(
      _mm256_xor_si256(s, _mm256_and_si256(_mm256_sllv_epi32(word, sh), top)));
}

RINGFLOW_AVX2 std::size_t unpack_signs_add_avx2(const std::uint32_t* words, float* out,
                                                std::size_t n, float scale) {
  // Lane l of group k needs bit 8k + l of the word in bit 31: shift left by 31 - 8k - l.
  const __m256i sh0 = _mm256_setr_epi32(31, 30, 29, 28, 27, 26, 25, 24);
  const __m256i eight = _mm256_set1_epi32(8);
  const __m256i sh1 = _mm256_sub_epi32(sh0, eight), sh2 = _mm256_sub_epi32(sh1, eight),
                sh3 = _mm256_sub_epi32(sh2, eight);
  const __m256i s = _mm256_set1_epi32(static_cast<int>(detail::float_bits(scale)));
  std::size_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m256i w = _mm256_set1_epi32(static_cast<int>(words[i / 32]));
    _mm256_storeu_ps(out + i,
                     _mm256_add_ps(_mm256_loadu_ps(out + i), signed_scale_avx2(w, sh0, s)));
    _mm256_storeu_ps(out + i + 8,
                     _mm256_add_ps(_mm256_loadu_ps(out + i + 8), signed_scale_avx2(w, sh1, s)));
    _mm256_storeu_ps(out + i + 16,
                     _mm256_add_ps(_mm256_loadu_ps(out + i + 16), signed_scale_avx2(w, sh2, s)));
    _mm256_storeu_ps(out + i + 24,
                     _mm256_add_ps(_mm256_loadu_ps(out + i + 24), signed_scale_avx2(w, sh3, s)));
  }
  _mm256_zeroupper();
  return i;
}

RINGFLOW_AVX2 std::size_t add_avx2(const float* in, float* out, std::size_t n) {
  std::size_t i = 0;
  for (; i + 16 <= n; i += 16) {
    _mm256_storeu_ps(out + i, _mm256_add_ps(_mm256_loadu_ps(out + i), _mm256_loadu_ps(in + i)));
    _mm256_storeu_ps(out + i + 8,
                     _mm256_add_ps(_mm256_loadu_ps(out + i + 8), _mm256_loadu_ps(in + i + 8)));
  }
  _mm256_zeroupper();
  return i;
}

// ---------------------------------------------------------------------------
// AVX-512 (F, BW, DQ, VL): the loops where 16 lanes or vpmullq pay; the
// others run their AVX2 loop on this path.

#define RINGFLOW_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2")))

RINGFLOW_AVX512 inline __m256i draw24_avx512(__m512i x) {
  const __m512i c1 = _mm512_set1_epi64(static_cast<long long>(0xbf58476d1ce4e5b9ull));
  const __m512i c2 = _mm512_set1_epi64(static_cast<long long>(0x94d049bb133111ebull));
  x = _mm512_xor_si512(x, _mm512_srli_epi64(x, 30));
  x = _mm512_mullo_epi64(x, c1);
  x = _mm512_xor_si512(x, _mm512_srli_epi64(x, 27));
  x = _mm512_mullo_epi64(x, c2);
  return _mm512_cvtepi64_epi32(_mm512_srli_epi64(x, 40));
}

RINGFLOW_AVX512 std::size_t quantize_avx512(const float* x, std::int8_t* q, std::size_t n,
                                            std::uint64_t first,
                                            const kernels::quantize_int8& quant) {
  const std::uint64_t s0 = quant.key + (first + 1) * golden_gamma;
  const __m512i lanes = _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7);
  const __m512i g = _mm512_set1_epi64(static_cast<long long>(golden_gamma));
  // Elements i..i+7 in `lo`, i+8..i+15 in `hi` (lane k: s0 + k * gamma).
  __m512i lo =
      _mm512_add_epi64(_mm512_set1_epi64(static_cast<long long>(s0)), _mm512_mullo_epi64(lanes, g));
  __m512i hi = _mm512_add_epi64(lo, _mm512_set1_epi64(static_cast<long long>(8 * golden_gamma)));
  const __m512i step16 = _mm512_set1_epi64(static_cast<long long>(16 * golden_gamma));
  const __m512 inv = _mm512_set1_ps(quant.inv_step);
  const __m512 lim = _mm512_set1_ps(static_cast<float>(quant.levels));
  const __m512 nlim = _mm512_set1_ps(-static_cast<float>(quant.levels));
  const __m512 scale24 = _mm512_set1_ps(1.0f / 16777216.0f);
  const __m512i one = _mm512_set1_epi32(1);
  std::size_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512i r =
        _mm512_inserti64x4(_mm512_castsi256_si512(draw24_avx512(lo)), draw24_avx512(hi), 1);
    lo = _mm512_add_epi64(lo, step16);
    hi = _mm512_add_epi64(hi, step16);
    const __m512 u = _mm512_mul_ps(_mm512_cvtepi32_ps(r), scale24);
    __m512 v = _mm512_mul_ps(_mm512_loadu_ps(x + i), inv);
    v = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(v, v, _CMP_ORD_Q), v);  // NaN -> +0
    v = _mm512_min_ps(_mm512_max_ps(v, nlim), lim);
    const __m512 f = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    const __mmask16 up = _mm512_cmp_ps_mask(u, _mm512_sub_ps(v, f), _CMP_LT_OQ);
    const __m512i qi =
        _mm512_mask_add_epi32(_mm512_cvttps_epi32(f), up, _mm512_cvttps_epi32(f), one);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i), _mm512_cvtsepi32_epi8(qi));
  }
  _mm256_zeroupper();
  return i;
}

RINGFLOW_AVX512 std::size_t abs_sum_avx512(const float* x, std::size_t n, float* lane) {
  __m512 a0 = _mm512_setzero_ps(), a1 = a0;
  std::size_t i = 0;
  for (; i + 32 <= n; i += 32) {
    a0 = _mm512_add_ps(a0, _mm512_abs_ps(_mm512_loadu_ps(x + i)));
    a1 = _mm512_add_ps(a1, _mm512_abs_ps(_mm512_loadu_ps(x + i + 16)));
  }
  _mm512_storeu_ps(lane, a0);
  _mm512_storeu_ps(lane + 16, a1);
  _mm256_zeroupper();
  return i;
}

RINGFLOW_AVX512 std::size_t pack_signs_avx512(const float* x, std::uint32_t* words, std::size_t n) {
  std::size_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const std::uint32_t lo = _mm512_movepi32_mask(_mm512_castps_si512(_mm512_loadu_ps(x + i)));
    const std::uint32_t hi = _mm512_movepi32_mask(_mm512_castps_si512(_mm512_loadu_ps(x + i + 16)));
    words[i / 32] = lo | hi << 16;
  }
  _mm256_zeroupper();
  return i;
}

RINGFLOW_AVX512 std::size_t unpack_signs_add_avx512(const std::uint32_t* words, float* out,
                                                    std::size_t n, float scale) {
  const __m512 pos = _mm512_set1_ps(scale);
  const __m512 neg = _mm512_castsi512_ps(
      _mm512_set1_epi32(static_cast<int>(detail::float_bits(scale) ^ 0x80000000u)));
  std::size_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const std::uint32_t w = words[i / 32];
    const __m512 a = _mm512_mask_blend_ps(static_cast<__mmask16>(w & 0xffffu), pos, neg);
    const __m512 b = _mm512_mask_blend_ps(static_cast<__mmask16>(w >> 16), pos, neg);
    _mm512_storeu_ps(out + i, _mm512_add_ps(_mm512_loadu_ps(out + i), a));
    _mm512_storeu_ps(out + i + 16, _mm512_add_ps(_mm512_loadu_ps(out + i + 16), b));
  }
  _mm256_zeroupper();
  return i;
}

codec_path detect() noexcept {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx2")) {
    return codec_path::avx512;
  }
  if (__builtin_cpu_supports("avx2")) return codec_path::avx2;
  return codec_path::baseline;
}
#else
codec_path detect() noexcept { return codec_path::baseline; }
#endif

codec_path hardware_path() noexcept {
  static const codec_path p = detect();
  return p;
}

codec_path capped_path() noexcept {
  const codec_path hw = hardware_path();
  // The words in codec_path's order; a malformed value warns and keeps `hw`.
  const int i = env::choice("RINGFLOW_CODEC_PATH", {"baseline", "avx2", "avx512"},
                            static_cast<int>(hw), env::malformed::warn);
  const auto want = static_cast<codec_path>(i);
  return want < hw ? want : hw;
}

// The path to run: `path` if this CPU has it, else not_supported_error.
codec_path check(codec_path path) {
  if (path > hardware_path()) {
    throw not_supported_error(
        fmt::format("CPU codec path {} needs instructions this CPU lacks (it runs up to {}); use "
                    "best_codec_path() or codec_path::baseline",
                    to_string(path), to_string(hardware_path())));
  }
  return path;
}

}  // namespace

codec_path best_codec_path() noexcept {
  static const codec_path p = capped_path();
  return p;
}

std::vector<codec_path> supported_codec_paths() {
  std::vector<codec_path> out{codec_path::baseline};
  if (hardware_path() >= codec_path::avx2) out.push_back(codec_path::avx2);
  if (hardware_path() >= codec_path::avx512) out.push_back(codec_path::avx512);
  return out;
}

const char* to_string(codec_path path) noexcept {
  switch (path) {
    case codec_path::avx2: return "avx2";
    case codec_path::avx512: return "avx512";
    default: return "baseline";
  }
}

namespace cpu {

float block_absmax(const float* x, std::size_t n, codec_path path) {
  std::size_t done = 0;
  std::uint32_t m = 0;
#ifdef RINGFLOW_X86_CODECS
  if (check(path) >= codec_path::avx2) done = absmax_avx2(x, n, m);
#else
  check(path);
#endif
  const std::uint32_t rest = detail::float_bits(absmax_baseline(x + done, n - done));
  return detail::bits_float(rest > m ? rest : m);
}

void quantize_int8(const float* x, std::int8_t* q, std::size_t n, std::uint64_t first_index,
                   const kernels::quantize_int8& quant, codec_path path) {
  std::size_t done = 0;
#ifdef RINGFLOW_X86_CODECS
  switch (check(path)) {
    case codec_path::avx512: done = quantize_avx512(x, q, n, first_index, quant); break;
    case codec_path::avx2: done = quantize_avx2(x, q, n, first_index, quant); break;
    default: break;
  }
#else
  check(path);
#endif
  quantize_baseline(x + done, q + done, n - done, first_index + done, quant);
}

void dequantize_int8(const std::int8_t* q, float* out, std::size_t n, float step, bool add,
                     codec_path path) {
  std::size_t done = 0;
#ifdef RINGFLOW_X86_CODECS
  if (check(path) >= codec_path::avx2) done = dequantize_avx2(q, out, n, step, add);
#else
  check(path);
#endif
  dequantize_baseline(q + done, out + done, n - done, step, add);
}

void encode_bf16(const float* in, std::uint16_t* out, std::size_t n, codec_path path) {
  std::size_t done = 0;
#ifdef RINGFLOW_X86_CODECS
  if (check(path) >= codec_path::avx2) done = encode_bf16_avx2(in, out, n);
#else
  check(path);
#endif
  encode_bf16_baseline(in + done, out + done, n - done);
}

void decode_bf16(const std::uint16_t* in, float* out, std::size_t n, bool add, codec_path path) {
  std::size_t done = 0;
#ifdef RINGFLOW_X86_CODECS
  if (check(path) >= codec_path::avx2) done = decode_bf16_avx2(in, out, n, add);
#else
  check(path);
#endif
  decode_bf16_baseline(in + done, out + done, n - done, add);
}

float abs_sum_block(const float* x, std::size_t n, codec_path path) {
  float lane[kernels::sum_lanes] = {};
  std::size_t done = 0;
#ifdef RINGFLOW_X86_CODECS
  switch (check(path)) {
    case codec_path::avx512: done = abs_sum_avx512(x, n, lane); break;
    case codec_path::avx2: done = abs_sum_avx2(x, n, lane); break;
    default: break;
  }
#else
  check(path);
#endif
  // The rest exactly as kernels::abs_sum_block continues: whole groups of 32,
  // then the partial group into the first lanes.
  std::size_t base = done;
  for (; base + kernels::sum_lanes <= n; base += kernels::sum_lanes) {
    for (unsigned l = 0; l < kernels::sum_lanes; ++l)
      lane[l] = lane[l] + kernels::abs_value(x[base + l]);
  }
  for (unsigned l = 0; base + l < n; ++l) lane[l] = lane[l] + kernels::abs_value(x[base + l]);
  return kernels::fold_lanes(lane);
}

void pack_signs(const float* x, std::uint32_t* words, std::size_t n, codec_path path) {
  std::size_t done = 0;
#ifdef RINGFLOW_X86_CODECS
  switch (check(path)) {
    case codec_path::avx512: done = pack_signs_avx512(x, words, n); break;
    case codec_path::avx2: done = pack_signs_avx2(x, words, n); break;
    default: break;
  }
#else
  check(path);
#endif
  pack_signs_baseline(x + done, words + done / 32, n - done);
}

void unpack_signs_add(const std::uint32_t* words, float* out, std::size_t n, float scale,
                      codec_path path) {
  std::size_t done = 0;
#ifdef RINGFLOW_X86_CODECS
  switch (check(path)) {
    case codec_path::avx512: done = unpack_signs_add_avx512(words, out, n, scale); break;
    case codec_path::avx2: done = unpack_signs_add_avx2(words, out, n, scale); break;
    default: break;
  }
#else
  check(path);
#endif
  unpack_signs_add_baseline(words + done / 32, out + done, n - done, scale);
}

void add(const float* in, float* out, std::size_t n, codec_path path) {
  std::size_t done = 0;
#ifdef RINGFLOW_X86_CODECS
  if (check(path) >= codec_path::avx2) done = add_avx2(in, out, n);
#else
  check(path);
#endif
  add_baseline(in + done, out + done, n - done);
}

}  // namespace cpu
}  // namespace ringflow::compress
