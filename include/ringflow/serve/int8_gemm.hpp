// Integer matrix products for quantized inference: uint8 (or int8)
// activations times int8 weights into exact int32 sums, with a baseline loop
// and AVX2 / AVX-512 VNNI clones chosen at run time.
//
// The library is compiled for baseline x86-64 (docs/design.md, "Fast CPU
// products, portably"): the clones are built with __attribute__((target))
// and run only where __builtin_cpu_supports says the CPU has them. Every
// path gives the same int32 sums, bit for bit (integer arithmetic: no
// rounding, no saturation).
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "ringflow/ad/shape.hpp"

namespace ringflow::serve {

using index = std::ptrdiff_t;

/// Which loops the int8 products run.
enum class int8_path {
  baseline,     ///< plain C++ (whatever the compiler vectorizes at baseline x86-64)
  avx2,         ///< AVX2: int16 products summed in pairs (vpmaddwd), 8 int32 lanes
  avx512_vnni,  ///< AVX-512 VNNI: u8 x s8 products summed in fours (vpdpbusd), 16 lanes
};

/// The fastest path this CPU runs, capped by RINGFLOW_INT8_PATH (baseline,
/// avx2 or avx512_vnni; read once) so that a run can be forced onto a slower
/// one. Every path gives the same sums.
int8_path best_int8_path() noexcept;
/// Every path this CPU can run, baseline first (for tests and benchmarks).
std::vector<int8_path> supported_int8_paths();
/// "baseline", "avx2" or "avx512_vnni".
const char* to_string(int8_path path) noexcept;

/// The largest inner dimension k the products accept: the sums stay exact in
/// int32 up to it (255 * 128 * 65536 < 2^31).
inline constexpr index max_int8_depth = 65536;

/// An int8 weight matrix B [k, n], packed once into the layout of one path's
/// loops (k padded to the path's group of 2 or 4, n to its 8 or 16 lanes,
/// with zeros), plus its column sums (for the activations' zero point).
/// @code
///   serve::packed_int8_matrix w(weights.data(), k, n);   // best path
///   serve::gemm_u8s8s32(m, x_u8.data(), k, /*zero point=*/128, w, out.data(), n);
/// @endcode
class packed_int8_matrix {
 public:
  packed_int8_matrix() = default;
  /// `b` is k x n, row-major with row stride `ldb` (>= n). Throws
  /// usage_error for bad sizes and not_supported_error for a path this CPU lacks.
  packed_int8_matrix(const std::int8_t* b, index k, index n, index ldb,
                     int8_path path = best_int8_path());

  index rows() const noexcept { return k_; }
  index cols() const noexcept { return n_; }
  int8_path path() const noexcept { return path_; }
  bool empty() const noexcept { return n_ == 0; }
  /// sum over l of B[l, j], for each column j.
  const std::vector<std::int32_t>& column_sums() const noexcept { return colsum_; }
  /// Bytes of the packed layout (the padded weights and the column sums).
  std::size_t bytes() const noexcept;

  // The layout, for the loops in src/serve/int8_gemm.cpp.
  const std::int8_t* bytes_data() const noexcept { return bytes_.data(); }
  const std::int16_t* words_data() const noexcept { return words_.data(); }

 private:
  index k_ = 0;
  index n_ = 0;
  int8_path path_ = int8_path::baseline;
  std::vector<std::int8_t> bytes_;   // baseline: B transposed [n][k]; VNNI: 16 x 4 blocks
  std::vector<std::int16_t> words_;  // AVX2: 8 x 2 blocks of int16
  std::vector<std::int32_t> colsum_;
};

/// C[i, j] = sum over l < k of (A[i, l] - a_zero_point) * B[l, j], for
/// i < m and j < n (b.rows() = k, b.cols() = n). A is m x k uint8 with row
/// stride `lda`, C is m x n int32 with row stride `ldc`. Exact: integer
/// arithmetic with no saturation; runs the path `b` was packed for.
void gemm_u8s8s32(index m, const std::uint8_t* a, index lda, std::int32_t a_zero_point,
                  const packed_int8_matrix& b, std::int32_t* c, index ldc);

/// C = A B for signed int8 activations A (m x k, stride `lda`): A + 128 is
/// run as uint8 with zero point 128, so the sums are the same exact ones.
void gemm_s8s8s32(index m, const std::int8_t* a, index lda, const packed_int8_matrix& b,
                  std::int32_t* c, index ldc);

/// The quantization of a layer's input to uint8, vectorized on `path`:
/// q[i] = trunc(clamp(x[i] * inv_scale + zero_point, 0, 255) + 0.5) (ties
/// round up, NaN becomes 0). The same bits on every path (no fused
/// multiply-add: src/serve is compiled with -ffp-contract=off).
void quantize_u8(const float* x, std::size_t n, float inv_scale, float zero_point, std::uint8_t* q,
                 int8_path path = best_int8_path());

}  // namespace ringflow::serve
