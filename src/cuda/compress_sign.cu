// Fused 1-bit scaled sign with error feedback (ringflow/cuda/compress.hpp).
//
// One warp per scale block: lane l holds the elements l, l + 32, l + 64, ...
// of the block, which is the canonical summation order of
// kernels::abs_sum_block (lane sums in increasing index, then the butterfly
// fold), so the scale is bit for bit the CPU's; one __ballot_sync per 32
// elements is exactly one packed sign word. The loads of a warp are 128-byte
// coalesced and a lane issues all of its block's loads before the first use,
// so up to 2 x 32 loads per lane are in flight; no shared memory is needed.
#include <cuda_runtime.h>

#include "compress_common.cuh"
#include "ringflow/cuda/compress.hpp"

namespace ringflow::cuda {

namespace {

using namespace compress_detail;

__device__ __forceinline__ float signed_scale(float c, float scale) {
  // -scale for a set sign bit: the value unpack_sign decodes for this element.
  return ringflow::detail::bits_float(ringflow::detail::float_bits(scale) ^
                                      (kn::sign_bit(c) << 31));
}

// The residual of a gather compressor: the CPU decodes its own payload into
// zeros (mine = 0 + t) and keeps c - mine; 0 + t differs from t only for
// t = -0, which the sign decode yields for an all-zero block.
__device__ __forceinline__ float gather_residual(float c, float t) {
  return kn::ef_residual{}(c, 0.0f + t);
}

// PL elements per lane in registers (block <= 32 * PL).
template <int PL, bool HasR>
__global__ void __launch_bounds__(cta_threads)
    sign_encode_kernel(const float* __restrict__ g, float* __restrict__ r, std::size_t n,
                       unsigned block, std::size_t nb, float* __restrict__ scales,
                       std::uint32_t* __restrict__ words) {
  const std::size_t b = static_cast<std::size_t>(blockIdx.x) * warps_per_cta + threadIdx.x / 32;
  if (b >= nb) return;  // whole warps leave together: b is the same across a warp
  const unsigned lane = threadIdx.x & 31u;
  const std::size_t lo = b * block;
  const auto count = static_cast<unsigned>(n - lo < block ? n - lo : block);
  float c[PL];
#pragma unroll
  for (int t = 0; t < PL; ++t) {
    const unsigned j = 32u * t + lane;
    c[t] = 0.0f;
    if (j < count) {
      const float gv = g[lo + j];
      c[t] = HasR ? kn::ef_compensate{}(gv, r[lo + j]) : gv;
    }
  }
  float s = 0.0f;
#pragma unroll
  for (int t = 0; t < PL; ++t) {
    if (32u * t + lane < count) s = s + kn::abs_value(c[t]);
  }
  s = warp_fold(s);
  const float scale = s / static_cast<float>(count);
  std::uint32_t my_word = 0;
#pragma unroll
  for (int t = 0; t < PL; ++t) {
    const unsigned j = 32u * t + lane;
    const bool in = j < count;
    const std::uint32_t w = __ballot_sync(full_mask, in && kn::sign_bit(c[t]) != 0);
    if (lane == static_cast<unsigned>(t)) my_word = w;
    if (HasR && in) r[lo + j] = gather_residual(c[t], signed_scale(c[t], scale));
  }
  if (lane < (count + 31) / 32) words[lo / 32 + lane] = my_word;
  if (lane == 0) scales[b] = scale;
}

// Blocks above 1024 elements: the sum streams the block, then a second pass
// recomputes c (the same bits) to write the words and the residual.
template <bool HasR>
__global__ void __launch_bounds__(cta_threads)
    sign_encode_stream_kernel(const float* __restrict__ g, float* __restrict__ r, std::size_t n,
                              std::size_t block, std::size_t nb, float* __restrict__ scales,
                              std::uint32_t* __restrict__ words) {
  const std::size_t b = static_cast<std::size_t>(blockIdx.x) * warps_per_cta + threadIdx.x / 32;
  if (b >= nb) return;
  const unsigned lane = threadIdx.x & 31u;
  const std::size_t lo = b * block;
  const std::size_t count = n - lo < block ? n - lo : block;
  auto comp = [&](std::size_t i) { return HasR ? kn::ef_compensate{}(g[i], r[i]) : g[i]; };
  float s = 0.0f;
  for (std::size_t j = lane; j < count; j += 32) s = s + kn::abs_value(comp(lo + j));
  s = warp_fold(s);
  const float scale = s / static_cast<float>(count);
  for (std::size_t base = 0; base < count; base += 32) {
    const std::size_t j = base + lane;
    const bool in = j < count;
    const float c = in ? comp(lo + j) : 0.0f;
    const std::uint32_t w = __ballot_sync(full_mask, in && kn::sign_bit(c) != 0);
    if (lane == 0) words[(lo + base) / 32] = w;
    if (HasR && in) r[lo + j] = gather_residual(c, signed_scale(c, scale));
  }
  if (lane == 0) scales[b] = scale;
}

// out = (0 + d_0 + d_1 + ... ) / divide_by over `count` payloads, payload p
// having its scales at scales + p * stride and its words at words + p * stride
// (bytes); with Accumulate (count 1): out += d_0, the plain decode-add. One
// warp per scale block.
template <bool Accumulate>
__global__ void __launch_bounds__(cta_threads)
    sign_decode_kernel(const unsigned char* __restrict__ scales,
                       const unsigned char* __restrict__ words, std::size_t stride, int count,
                       std::size_t n, std::size_t block, std::size_t nb, float* __restrict__ out,
                       int divide_by) {
  const std::size_t b = static_cast<std::size_t>(blockIdx.x) * warps_per_cta + threadIdx.x / 32;
  if (b >= nb) return;
  const unsigned lane = threadIdx.x & 31u;
  const std::size_t lo = b * block;
  const std::size_t len = n - lo < block ? n - lo : block;
  // Element i of payload p decodes to +-scale_p(b), bit i % 32 of word i / 32.
  auto decode = [&](std::size_t i, float acc) {
    for (int p = 0; p < count; ++p) {
      const std::size_t off = static_cast<std::size_t>(p) * stride;
      const float scale = reinterpret_cast<const float*>(scales + off)[b];
      const std::uint32_t word = reinterpret_cast<const std::uint32_t*>(words + off)[i / 32];
      acc = acc + kn::unpack_sign(word, static_cast<unsigned>(i % 32), scale);
    }
    return divide_by > 1 ? acc / static_cast<float>(divide_by) : acc;
  };
  std::size_t base = 0;
  for (; base + 32 * chunk_lanes <= len; base += 32 * chunk_lanes) {
    float o[chunk_lanes];
#pragma unroll
    for (int u = 0; u < chunk_lanes; ++u) o[u] = Accumulate ? out[lo + base + 32 * u + lane] : 0.0f;
#pragma unroll
    for (int u = 0; u < chunk_lanes; ++u) {
      const std::size_t i = lo + base + 32 * u + lane;
      out[i] = decode(i, o[u]);
    }
  }
  for (std::size_t j = base + lane; j < len; j += 32) {
    const std::size_t i = lo + j;
    out[i] = decode(i, Accumulate ? out[i] : 0.0f);
  }
}

// The same decode for blocks of up to 32 * PL elements, in registers: per
// payload a lane loads the scale and one word of the block (lane w: word w),
// and the warp passes word t around with __shfl_sync; the per-element order
// of the additions is unchanged (payload 0 first).
template <int PL, bool Accumulate>
__global__ void __launch_bounds__(cta_threads)
    sign_decode_reg_kernel(const unsigned char* __restrict__ scales,
                           const unsigned char* __restrict__ words, std::size_t stride, int count,
                           std::size_t n, unsigned block, std::size_t nb, float* __restrict__ out,
                           int divide_by) {
  const std::size_t b = static_cast<std::size_t>(blockIdx.x) * warps_per_cta + threadIdx.x / 32;
  if (b >= nb) return;
  const unsigned lane = threadIdx.x & 31u;
  const std::size_t lo = b * block;
  const auto len = static_cast<unsigned>(n - lo < block ? n - lo : block);
  const unsigned nw = (len + 31) / 32;  // words of this block (<= PL)
  float acc[PL];
#pragma unroll
  for (int t = 0; t < PL; ++t) {
    const unsigned j = 32u * t + lane;
    acc[t] = Accumulate && j < len ? out[lo + j] : 0.0f;
  }
  for (int p = 0; p < count; ++p) {
    const std::size_t off = static_cast<std::size_t>(p) * stride;
    const float scale = reinterpret_cast<const float*>(scales + off)[b];
    const auto* wp = reinterpret_cast<const std::uint32_t*>(words + off) + lo / 32;
    const std::uint32_t mine = lane < nw ? wp[lane] : 0u;
#pragma unroll
    for (int t = 0; t < PL; ++t) {
      const std::uint32_t w = __shfl_sync(full_mask, mine, t);
      acc[t] = acc[t] + kn::unpack_sign(w, lane, scale);
    }
  }
#pragma unroll
  for (int t = 0; t < PL; ++t) {
    const unsigned j = 32u * t + lane;
    if (j < len) out[lo + j] = divide_by > 1 ? acc[t] / static_cast<float>(divide_by) : acc[t];
  }
}

template <bool Accumulate>
void launch_decode(const unsigned char* scales, const unsigned char* words, std::size_t stride,
                   int count, std::size_t n, std::size_t block, float* out, int divide_by,
                   cudaStream_t s) {
  const std::size_t nb = block_count(n, block);
  const unsigned grid = ctas_for_warps(nb);
  dispatch_lanes(block, [&](auto pl) {
    constexpr int PL = decltype(pl)::value;
    if constexpr (PL == 0) {
      sign_decode_kernel<Accumulate>
          <<<grid, cta_threads, 0, s>>>(scales, words, stride, count, n, block, nb, out, divide_by);
    } else {
      sign_decode_reg_kernel<PL, Accumulate><<<grid, cta_threads, 0, s>>>(
          scales, words, stride, count, n, static_cast<unsigned>(block), nb, out, divide_by);
    }
  });
  RINGFLOW_CHECK_LAUNCH("sign_decode_kernel");
}

void check_block(std::size_t block, const char* what) {
  require(block > 0 && block % 32 == 0 && block <= (std::size_t{1} << 30), what,
          "block must be a positive multiple of 32 elements, got " + std::to_string(block));
}

}  // namespace

void sign_ef_encode(const float* grad, float* residual, std::size_t n, std::size_t block,
                    float* scales, std::uint32_t* words, cudaStream_t s) {
  check_block(block, "cuda::sign_ef_encode");
  if (n == 0) return;
  const std::size_t nb = block_count(n, block);
  const unsigned grid = ctas_for_warps(nb);
  dispatch_lanes(block, [&](auto pl) {
    constexpr int PL = decltype(pl)::value;
    if constexpr (PL == 0) {
      if (residual) {
        sign_encode_stream_kernel<true>
            <<<grid, cta_threads, 0, s>>>(grad, residual, n, block, nb, scales, words);
      } else {
        sign_encode_stream_kernel<false>
            <<<grid, cta_threads, 0, s>>>(grad, residual, n, block, nb, scales, words);
      }
    } else {
      const auto blk = static_cast<unsigned>(block);
      if (residual) {
        sign_encode_kernel<PL, true>
            <<<grid, cta_threads, 0, s>>>(grad, residual, n, blk, nb, scales, words);
      } else {
        sign_encode_kernel<PL, false>
            <<<grid, cta_threads, 0, s>>>(grad, residual, n, blk, nb, scales, words);
      }
    }
  });
  RINGFLOW_CHECK_LAUNCH("sign_encode_kernel");
}

void sign_decode_add(const float* scales, const std::uint32_t* words, std::size_t n,
                     std::size_t block, float* out, cudaStream_t s) {
  check_block(block, "cuda::sign_decode_add");
  if (n == 0) return;
  launch_decode<true>(reinterpret_cast<const unsigned char*>(scales),
                      reinterpret_cast<const unsigned char*>(words), 0, 1, n, block, out, 1, s);
}

void sign_decode_sum(const void* payloads, std::size_t payload_stride, int count, std::size_t n,
                     std::size_t block, float* out, int divide_by, cudaStream_t s) {
  check_block(block, "cuda::sign_decode_sum");
  require(count >= 1, "cuda::sign_decode_sum", "needs at least one payload");
  require(payload_stride % 4 == 0 && aligned(payloads, 4), "cuda::sign_decode_sum",
          "payloads and their stride must be 4-byte aligned");
  if (n == 0) return;
  const auto* base = static_cast<const unsigned char*>(payloads);
  launch_decode<false>(base, base + 4 * block_count(n, block), payload_stride, count, n, block, out,
                       divide_by, s);
}

}  // namespace ringflow::cuda
