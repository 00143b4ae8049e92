// uint8 x int8 -> int32 products: a baseline loop, and AVX2 / AVX-512 VNNI
// clones picked at run time (tests/serve/test_int8_gemm.cpp compares every
// path with a scalar int32 reference, edge values and odd sizes included).
//
// Why every path gives the same sums: all of them add exact integer
// products in int32. VNNI's vpdpbusd multiplies u8 by s8 and adds four
// products at a time into int32 without saturation (unlike vpmaddubsw, whose
// int16 pair sums saturate at 255 * 127 * 2 > 32767: that is why the AVX2
// path widens both operands to int16 and uses vpmaddwd, whose pair sums are
// at most 2 * 255 * 128). The zero point is taken off at the end, as
// zero_point * column sum, and int32 arithmetic wraps consistently, so the
// result is exact whenever the true sum fits (k <= max_int8_depth).
#include "ringflow/serve/int8_gemm.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cstring>

#include "ringflow/core/env.hpp"
#include "ringflow/core/error.hpp"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define RINGFLOW_X86_INT8 1
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#endif

namespace ringflow::serve {

namespace {

index round_up(index v, index to) { return (v + to - 1) / to * to; }

// ---------------------------------------------------------------------------
// Baseline: B transposed, one dot product per output.

void gemm_baseline(index m, const std::uint8_t* a, index lda, const packed_int8_matrix& b,
                   const std::int32_t* corr, std::int32_t* c, index ldc) {
  const index k = b.rows(), n = b.cols();
  const std::int8_t* bt = b.bytes_data();
  for (index i = 0; i < m; ++i) {
    const std::uint8_t* ar = a + i * lda;
    for (index j = 0; j < n; ++j) {
      const std::int8_t* bc = bt + j * k;
      std::int32_t s = 0;
      for (index l = 0; l < k; ++l) s += static_cast<std::int32_t>(ar[l]) * bc[l];
      c[i * ldc + j] = s - corr[j];
    }
  }
}

void quantize_baseline(const float* x, std::size_t n, float inv, float zp, std::uint8_t* q) {
  for (std::size_t i = 0; i < n; ++i) {
    float v = x[i] * inv + zp;
    v = v > 0.0f ? v : 0.0f;  // NaN too
    v = v < 255.0f ? v : 255.0f;
    q[i] = static_cast<std::uint8_t>(static_cast<int>(v + 0.5f));
  }
}

#ifdef RINGFLOW_X86_INT8
// ---------------------------------------------------------------------------
// AVX2: column blocks of 8, k in pairs, weights as int16. A block of MR rows
// x NB column blocks keeps MR * NB accumulators (at most 8 of the 16 ymm).

#define RINGFLOW_AVX2 __attribute__((target("avx2")))

template <int MR, int NB>
RINGFLOW_AVX2 void avx2_block(const std::uint8_t* a, index lda, index k, const std::int16_t* panel,
                              index groups, const std::int32_t* corr, std::int32_t* c, index ldc,
                              index cols) {
  __m256i acc[MR][NB];
  for (int r = 0; r < MR; ++r)
    for (int nb = 0; nb < NB; ++nb) acc[r][nb] = _mm256_setzero_si256();
  const index full = k / 2;
  for (index g = 0; g < groups; ++g) {
    __m256i w[NB];
    for (int nb = 0; nb < NB; ++nb) {
      w[nb] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(panel + (nb * groups + g) * 16));
    }
    for (int r = 0; r < MR; ++r) {
      const std::uint8_t* ar = a + r * lda + 2 * g;
      const std::uint32_t lo = ar[0];
      const std::uint32_t hi = g < full ? ar[1] : 0u;  // k odd: the last pair is half padding
      const __m256i av = _mm256_set1_epi32(static_cast<int>(lo | hi << 16));
      for (int nb = 0; nb < NB; ++nb) {
        acc[r][nb] = _mm256_add_epi32(acc[r][nb], _mm256_madd_epi16(av, w[nb]));
      }
    }
  }
  for (int nb = 0; nb < NB; ++nb) {
    const index left = cols - 8 * nb;
    if (left <= 0) break;
    const __m256i cv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(corr + 8 * nb));
    for (int r = 0; r < MR; ++r) {
      const __m256i res = _mm256_sub_epi32(acc[r][nb], cv);
      std::int32_t* out = c + r * ldc + 8 * nb;
      if (left >= 8) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), res);
      } else {
        alignas(32) std::int32_t tmp[8];
        _mm256_store_si256(reinterpret_cast<__m256i*>(tmp), res);
        std::memcpy(out, tmp, static_cast<std::size_t>(left) * sizeof(std::int32_t));
      }
    }
  }
}

template <int MR>
RINGFLOW_AVX2 void avx2_rows(int nb, const std::uint8_t* a, index lda, index k,
                             const std::int16_t* panel, index groups, const std::int32_t* corr,
                             std::int32_t* c, index ldc, index cols) {
  if (nb == 2) {
    avx2_block<MR, 2>(a, lda, k, panel, groups, corr, c, ldc, cols);
  } else {
    avx2_block<MR, 1>(a, lda, k, panel, groups, corr, c, ldc, cols);
  }
}

RINGFLOW_AVX2 void gemm_avx2(index m, const std::uint8_t* a, index lda, const packed_int8_matrix& b,
                             const std::int32_t* corr, std::int32_t* c, index ldc) {
  const index k = b.rows(), n = b.cols();
  const index groups = round_up(k, 2) / 2;
  const index blocks = round_up(n, 8) / 8;
  for (index jb = 0; jb < blocks; jb += 2) {
    const int nb = static_cast<int>(std::min<index>(2, blocks - jb));
    const std::int16_t* panel = b.words_data() + jb * groups * 16;
    const index cols = n - 8 * jb;
    for (index i = 0; i < m; i += 4) {
      const index mr = std::min<index>(4, m - i);
      const std::uint8_t* ai = a + i * lda;
      std::int32_t* ci = c + i * ldc + 8 * jb;
      switch (mr) {
        case 4: avx2_rows<4>(nb, ai, lda, k, panel, groups, corr + 8 * jb, ci, ldc, cols); break;
        case 3: avx2_rows<3>(nb, ai, lda, k, panel, groups, corr + 8 * jb, ci, ldc, cols); break;
        case 2: avx2_rows<2>(nb, ai, lda, k, panel, groups, corr + 8 * jb, ci, ldc, cols); break;
        default: avx2_rows<1>(nb, ai, lda, k, panel, groups, corr + 8 * jb, ci, ldc, cols); break;
      }
    }
  }
  _mm256_zeroupper();
}

// ---------------------------------------------------------------------------
// AVX-512 VNNI: column blocks of 16, k in fours (64 bytes per block and
// group). MR rows x NB blocks: up to 16 accumulators of the 32 zmm.

#define RINGFLOW_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2")))

template <int MR, int NB>
RINGFLOW_VNNI void vnni_block(const std::uint8_t* a, index lda, index k, const std::int8_t* panel,
                              index groups, const std::int32_t* corr, std::int32_t* c, index ldc,
                              index cols) {
  __m512i acc[MR][NB];
  for (int r = 0; r < MR; ++r)
    for (int nb = 0; nb < NB; ++nb) acc[r][nb] = _mm512_setzero_si512();
  const index full = k / 4;
  for (index g = 0; g < full; ++g) {
    __m512i w[NB];
    for (int nb = 0; nb < NB; ++nb) w[nb] = _mm512_loadu_si512(panel + (nb * groups + g) * 64);
    for (int r = 0; r < MR; ++r) {
      std::int32_t four;
      std::memcpy(&four, a + r * lda + 4 * g, 4);
      const __m512i av = _mm512_set1_epi32(four);
      for (int nb = 0; nb < NB; ++nb) acc[r][nb] = _mm512_dpbusd_epi32(acc[r][nb], av, w[nb]);
    }
  }
  if (full < groups) {  // k % 4 != 0: the last group reads only the bytes A has
    __m512i w[NB];
    for (int nb = 0; nb < NB; ++nb) w[nb] = _mm512_loadu_si512(panel + (nb * groups + full) * 64);
    for (int r = 0; r < MR; ++r) {
      std::uint32_t four = 0;
      for (index t = 0; 4 * full + t < k; ++t) {
        four |= static_cast<std::uint32_t>(a[r * lda + 4 * full + t]) << (8 * t);
      }
      const __m512i av = _mm512_set1_epi32(static_cast<int>(four));
      for (int nb = 0; nb < NB; ++nb) acc[r][nb] = _mm512_dpbusd_epi32(acc[r][nb], av, w[nb]);
    }
  }
  for (int nb = 0; nb < NB; ++nb) {
    const index left = cols - 16 * nb;
    if (left <= 0) break;
    const __mmask16 mask =
        left >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << left) - 1);
    const __m512i cv = _mm512_loadu_si512(corr + 16 * nb);
    for (int r = 0; r < MR; ++r) {
      _mm512_mask_storeu_epi32(c + r * ldc + 16 * nb, mask, _mm512_sub_epi32(acc[r][nb], cv));
    }
  }
}

template <int MR>
RINGFLOW_VNNI void vnni_rows(int nb, const std::uint8_t* a, index lda, index k,
                             const std::int8_t* panel, index groups, const std::int32_t* corr,
                             std::int32_t* c, index ldc, index cols) {
  switch (nb) {
    case 4: vnni_block<MR, 4>(a, lda, k, panel, groups, corr, c, ldc, cols); break;
    case 3: vnni_block<MR, 3>(a, lda, k, panel, groups, corr, c, ldc, cols); break;
    case 2: vnni_block<MR, 2>(a, lda, k, panel, groups, corr, c, ldc, cols); break;
    default: vnni_block<MR, 1>(a, lda, k, panel, groups, corr, c, ldc, cols); break;
  }
}

RINGFLOW_VNNI void gemm_vnni(index m, const std::uint8_t* a, index lda, const packed_int8_matrix& b,
                             const std::int32_t* corr, std::int32_t* c, index ldc) {
  const index k = b.rows(), n = b.cols();
  const index groups = round_up(k, 4) / 4;
  const index blocks = round_up(n, 16) / 16;
  // Four column blocks (64 columns, 64 * k bytes of weights: 50 KB at k =
  // 784) stay in L1/L2 while every row block of A streams past them.
  for (index jb = 0; jb < blocks; jb += 4) {
    const int nb = static_cast<int>(std::min<index>(4, blocks - jb));
    const std::int8_t* panel = b.bytes_data() + jb * groups * 64;
    const index cols = n - 16 * jb;
    for (index i = 0; i < m; i += 4) {
      const index mr = std::min<index>(4, m - i);
      const std::uint8_t* ai = a + i * lda;
      std::int32_t* ci = c + i * ldc + 16 * jb;
      switch (mr) {
        case 4: vnni_rows<4>(nb, ai, lda, k, panel, groups, corr + 16 * jb, ci, ldc, cols); break;
        case 3: vnni_rows<3>(nb, ai, lda, k, panel, groups, corr + 16 * jb, ci, ldc, cols); break;
        case 2: vnni_rows<2>(nb, ai, lda, k, panel, groups, corr + 16 * jb, ci, ldc, cols); break;
        default: vnni_rows<1>(nb, ai, lda, k, panel, groups, corr + 16 * jb, ci, ldc, cols); break;
      }
    }
  }
  _mm256_zeroupper();
}

// Input quantization, 32 floats per step. max_ps(v, 0) returns 0 for a NaN
// v (the second operand), like the baseline's v > 0 ? v : 0.
RINGFLOW_AVX2 std::size_t quantize_avx2(const float* x, std::size_t n, float inv, float zp,
                                        std::uint8_t* q) {
  const __m256 vinv = _mm256_set1_ps(inv), vzp = _mm256_set1_ps(zp), lo = _mm256_setzero_ps(),
               hi = _mm256_set1_ps(255.0f), half = _mm256_set1_ps(0.5f);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  std::size_t i = 0;
  for (; i + 32 <= n; i += 32) {
    __m256i w[4];
    for (int k = 0; k < 4; ++k) {
      __m256 v = _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i + 8 * k), vinv), vzp);
      v = _mm256_min_ps(_mm256_max_ps(v, lo), hi);
      w[k] = _mm256_cvttps_epi32(_mm256_add_ps(v, half));
    }
    const __m256i b =
        _mm256_packus_epi16(_mm256_packus_epi32(w[0], w[1]), _mm256_packus_epi32(w[2], w[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + i), _mm256_permutevar8x32_epi32(b, order));
  }
  _mm256_zeroupper();
  return i;
}

RINGFLOW_VNNI std::size_t quantize_avx512(const float* x, std::size_t n, float inv, float zp,
                                          std::uint8_t* q) {
  const __m512 vinv = _mm512_set1_ps(inv), vzp = _mm512_set1_ps(zp), lo = _mm512_setzero_ps(),
               hi = _mm512_set1_ps(255.0f), half = _mm512_set1_ps(0.5f);
  std::size_t i = 0;
  for (; i + 16 <= n; i += 16) {
    __m512 v = _mm512_add_ps(_mm512_mul_ps(_mm512_loadu_ps(x + i), vinv), vzp);
    v = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
    const __m512i w = _mm512_cvttps_epi32(_mm512_add_ps(v, half));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i), _mm512_cvtusepi32_epi8(w));
  }
  _mm256_zeroupper();
  return i;
}

int8_path detect() noexcept {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni") &&
      __builtin_cpu_supports("avx2")) {
    return int8_path::avx512_vnni;
  }
  if (__builtin_cpu_supports("avx2")) return int8_path::avx2;
  return int8_path::baseline;
}
#else
int8_path detect() noexcept { return int8_path::baseline; }
#endif

int8_path hardware_path() noexcept {
  static const int8_path p = detect();
  return p;
}

int8_path capped_path() noexcept {
  const int8_path hw = hardware_path();
  const int i = env::choice("RINGFLOW_INT8_PATH", {"baseline", "avx2", "avx512_vnni"},
                            static_cast<int>(hw), env::malformed::warn);
  const auto want = static_cast<int8_path>(i);
  return want < hw ? want : hw;
}

// The padding of a path: k to a multiple of `kg`, n to one of `lanes`.
index group_of(int8_path p) {
  return p == int8_path::avx512_vnni ? 4 : p == int8_path::avx2 ? 2 : 1;
}
index lanes_of(int8_path p) {
  return p == int8_path::avx512_vnni ? 16 : p == int8_path::avx2 ? 8 : 1;
}

}  // namespace

int8_path best_int8_path() noexcept {
  static const int8_path p = capped_path();
  return p;
}

std::vector<int8_path> supported_int8_paths() {
  std::vector<int8_path> out{int8_path::baseline};
  if (hardware_path() >= int8_path::avx2) out.push_back(int8_path::avx2);
  if (hardware_path() >= int8_path::avx512_vnni) out.push_back(int8_path::avx512_vnni);
  return out;
}

const char* to_string(int8_path path) noexcept {
  switch (path) {
    case int8_path::avx2: return "avx2";
    case int8_path::avx512_vnni: return "avx512_vnni";
    default: return "baseline";
  }
}

packed_int8_matrix::packed_int8_matrix(const std::int8_t* b, index k, index n, index ldb,
                                       int8_path path)
    : k_(k), n_(n), path_(path) {
  if (k < 1 || n < 1 || k > max_int8_depth || ldb < n || b == nullptr) {
    throw usage_error(fmt::format(
        "serve::packed_int8_matrix: a {} x {} matrix with row stride {} cannot be packed: k must "
        "be in [1, {}], n at least 1, the stride at least n, and the data non-null",
        k, n, ldb, max_int8_depth));
  }
  if (path > hardware_path()) {
    throw not_supported_error(fmt::format(
        "serve::packed_int8_matrix: int8 path {} needs instructions this CPU lacks (it runs up to "
        "{}); use best_int8_path() or int8_path::baseline",
        to_string(path), to_string(hardware_path())));
  }
  colsum_.assign(static_cast<std::size_t>(n), 0);
  for (index l = 0; l < k; ++l)
    for (index j = 0; j < n; ++j) colsum_[static_cast<std::size_t>(j)] += b[l * ldb + j];
  const index kg = group_of(path), lanes = lanes_of(path);
  const index kp = round_up(k, kg), np = round_up(n, lanes);
  auto at = [&](index l, index j) -> std::int8_t { return l < k && j < n ? b[l * ldb + j] : 0; };
  switch (path) {
    case int8_path::baseline:
      bytes_.resize(static_cast<std::size_t>(n * k));
      for (index j = 0; j < n; ++j)
        for (index l = 0; l < k; ++l) bytes_[static_cast<std::size_t>(j * k + l)] = at(l, j);
      break;
    case int8_path::avx2: {
      // Block jb, pair g: 8 columns x 2 int16, [B(2g, col), B(2g+1, col)] per lane.
      const index groups = kp / 2;
      words_.resize(static_cast<std::size_t>(kp * np));
      for (index jb = 0; jb < np / 8; ++jb)
        for (index g = 0; g < groups; ++g)
          for (index col = 0; col < 8; ++col)
            for (index t = 0; t < 2; ++t) {
              words_[static_cast<std::size_t>(((jb * groups + g) * 8 + col) * 2 + t)] =
                  at(2 * g + t, jb * 8 + col);
            }
      break;
    }
    case int8_path::avx512_vnni: {
      // Block jb, group g: 16 columns x 4 bytes, B(4g..4g+3, col) per lane.
      const index groups = kp / 4;
      bytes_.resize(static_cast<std::size_t>(kp * np));
      for (index jb = 0; jb < np / 16; ++jb)
        for (index g = 0; g < groups; ++g)
          for (index col = 0; col < 16; ++col)
            for (index t = 0; t < 4; ++t) {
              bytes_[static_cast<std::size_t>(((jb * groups + g) * 16 + col) * 4 + t)] =
                  at(4 * g + t, jb * 16 + col);
            }
      break;
    }
  }
}

std::size_t packed_int8_matrix::bytes() const noexcept {
  return bytes_.size() + words_.size() * sizeof(std::int16_t) +
         colsum_.size() * sizeof(std::int32_t);
}

void gemm_u8s8s32(index m, const std::uint8_t* a, index lda, std::int32_t a_zero_point,
                  const packed_int8_matrix& b, std::int32_t* c, index ldc) {
  if (b.empty()) throw usage_error("serve::gemm_u8s8s32: the weight matrix is empty (not packed)");
  if (m < 0 || lda < b.rows() || ldc < b.cols() || a_zero_point < 0 || a_zero_point > 255) {
    throw usage_error(fmt::format(
        "serve::gemm_u8s8s32: m = {}, lda = {}, ldc = {}, zero point {} for a {} x {} weight "
        "matrix: m must be >= 0, lda >= k, ldc >= n and the zero point in [0, 255]",
        m, lda, ldc, a_zero_point, b.rows(), b.cols()));
  }
  if (m == 0) return;
  // zero_point * column sum, padded with zeros to the path's lanes.
  const index lanes = lanes_of(b.path());
  thread_local std::vector<std::int32_t> corr;
  corr.assign(static_cast<std::size_t>(round_up(b.cols(), lanes)), 0);
  for (index j = 0; j < b.cols(); ++j) {
    corr[static_cast<std::size_t>(j)] = a_zero_point * b.column_sums()[static_cast<std::size_t>(j)];
  }
  switch (b.path()) {
#ifdef RINGFLOW_X86_INT8
    case int8_path::avx512_vnni: gemm_vnni(m, a, lda, b, corr.data(), c, ldc); break;
    case int8_path::avx2: gemm_avx2(m, a, lda, b, corr.data(), c, ldc); break;
#endif
    default: gemm_baseline(m, a, lda, b, corr.data(), c, ldc); break;
  }
}

void quantize_u8(const float* x, std::size_t n, float inv_scale, float zero_point, std::uint8_t* q,
                 int8_path path) {
  if (path > hardware_path()) {
    throw not_supported_error(
        fmt::format("serve::quantize_u8: int8 path {} needs instructions this "
                    "CPU lacks (it runs up to {})",
                    to_string(path), to_string(hardware_path())));
  }
  std::size_t done = 0;
#ifdef RINGFLOW_X86_INT8
  if (path == int8_path::avx512_vnni) done = quantize_avx512(x, n, inv_scale, zero_point, q);
  if (path == int8_path::avx2) done = quantize_avx2(x, n, inv_scale, zero_point, q);
#endif
  quantize_baseline(x + done, n - done, inv_scale, zero_point, q + done);
}

void gemm_s8s8s32(index m, const std::int8_t* a, index lda, const packed_int8_matrix& b,
                  std::int32_t* c, index ldc) {
  if (m < 0 || lda < b.rows()) {
    throw usage_error(
        fmt::format("serve::gemm_s8s8s32: m = {} and lda = {} for k = {}", m, lda, b.rows()));
  }
  thread_local std::vector<std::uint8_t> shifted;
  const index k = b.rows();
  shifted.resize(static_cast<std::size_t>(m * k));
  for (index i = 0; i < m; ++i)
    for (index l = 0; l < k; ++l) {
      shifted[static_cast<std::size_t>(i * k + l)] =
          static_cast<std::uint8_t>(static_cast<std::uint8_t>(a[i * lda + l]) ^ 0x80u);
    }
  gemm_u8s8s32(m, shifted.data(), k, 128, b, c, ldc);
}

}  // namespace ringflow::serve
