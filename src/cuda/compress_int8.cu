// Fused int8 block quantization with stochastic rounding and error feedback
// (ringflow/cuda/compress.hpp).
//
// One warp per scale block, lane l holding elements l, l + 32, ... of it. The
// block scale is max |c| (order independent: a max of the magnitude bit
// patterns, so a NaN wins as on the CPU); element i draws
// kernels::uniform01(key, i), the CPU's number, so q, the scales and the
// residual are the CPU's bit for bit.
#include <cuda_runtime.h>

#include "compress_common.cuh"
#include "ringflow/cuda/compress.hpp"

namespace ringflow::cuda {

namespace {

using namespace compress_detail;

// Quantizes c (element i, random state st = key + i * golden_gamma) and
// stores q; returns what q decodes to. The float q from quantize_drawn is
// multiplied by the step directly (the same value as dequantize_int8 of the
// stored int8, without the int -> float conversion), and the random state is
// stepped by additions by the callers instead of a 64-bit multiply per element.
__device__ __forceinline__ float quantize_store(const kn::quantize_int8& quant, float step, float c,
                                                std::uint64_t st, std::int8_t* q) {
  const float qf = quant.quantize_drawn(c, kn::uniform01_state(st));
  *q = static_cast<std::int8_t>(static_cast<int>(qf));
  return kn::mul_rn(qf, step);
}

constexpr std::uint64_t lane_step = 32 * kn::golden_gamma;  // state step of 32 elements (mod 2^64)

__device__ __forceinline__ float compensated(const float* __restrict__ g,
                                             const float* __restrict__ r, std::size_t i) {
  return r ? kn::ef_compensate{}(g[i], r[i]) : g[i];
}

// (a) local scale, levels 127, PL elements per lane in registers.
template <int PL, bool HasR>
__global__ void __launch_bounds__(cta_threads)
    int8_encode_kernel(const float* __restrict__ g, float* __restrict__ r, std::size_t n,
                       unsigned block, std::size_t nb, std::uint64_t key,
                       float* __restrict__ scales, std::int8_t* __restrict__ q) {
  const std::size_t b = static_cast<std::size_t>(blockIdx.x) * warps_per_cta + threadIdx.x / 32;
  if (b >= nb) return;
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
      if constexpr (HasR) {
        c[t] = kn::ef_compensate{}(gv, r[lo + j]);
      } else {
        c[t] = gv;
      }
    }
  }
  std::uint32_t m = 0;
#pragma unroll
  for (int t = 0; t < PL; ++t) {
    const std::uint32_t a = 32u * t + lane < count ? kn::magnitude_key(c[t]) : 0u;
    m = a > m ? a : m;
  }
  const float scale = ringflow::detail::bits_float(warp_max(m));
  const kn::quantize_int8 quant{kn::int8_inv_step(scale, 127), 127, key};
  const float step = kn::int8_step(scale, 127);
  const std::uint64_t st0 = key + (lo + lane) * kn::golden_gamma;
#pragma unroll
  for (int t = 0; t < PL; ++t) {
    const unsigned j = 32u * t + lane;
    if (j < count) {
      const float sent = quantize_store(quant, step, c[t], st0 + t * lane_step, q + lo + j);
      if constexpr (HasR) r[lo + j] = kn::ef_residual{}(c[t], sent);
    }
  }
  if (lane == 0) scales[b] = scale;
}

// (a) for blocks above 1024 elements: max pass, then quantize pass
// recomputing c (the same bits).
template <bool HasR>
__global__ void __launch_bounds__(cta_threads)
    int8_encode_stream_kernel(const float* __restrict__ g, float* __restrict__ r, std::size_t n,
                              std::size_t block, std::size_t nb, std::uint64_t key,
                              float* __restrict__ scales, std::int8_t* __restrict__ q) {
  const std::size_t b = static_cast<std::size_t>(blockIdx.x) * warps_per_cta + threadIdx.x / 32;
  if (b >= nb) return;
  const unsigned lane = threadIdx.x & 31u;
  const std::size_t lo = b * block;
  const std::size_t count = n - lo < block ? n - lo : block;
  std::uint32_t m = 0;
  for (std::size_t j = lane; j < count; j += 32) {
    const std::uint32_t a = kn::magnitude_key(compensated(g, HasR ? r : nullptr, lo + j));
    m = a > m ? a : m;
  }
  const float scale = ringflow::detail::bits_float(warp_max(m));
  const kn::quantize_int8 quant{kn::int8_inv_step(scale, 127), 127, key};
  const float step = kn::int8_step(scale, 127);
  std::uint64_t st = key + (lo + lane) * kn::golden_gamma;
  for (std::size_t j = lane; j < count; j += 32, st += lane_step) {
    const float c = compensated(g, HasR ? r : nullptr, lo + j);
    const float sent = quantize_store(quant, step, c, st, q + lo + j);
    if constexpr (HasR) r[lo + j] = kn::ef_residual{}(c, sent);
  }
  if (lane == 0) scales[b] = scale;
}

// (b1) scales[b] = max |g + r| of block b.
template <bool HasR>
__global__ void __launch_bounds__(cta_threads)
    int8_absmax_kernel(const float* __restrict__ g, const float* __restrict__ r, std::size_t n,
                       std::size_t block, std::size_t nb, float* __restrict__ scales) {
  const std::size_t b = static_cast<std::size_t>(blockIdx.x) * warps_per_cta + threadIdx.x / 32;
  if (b >= nb) return;
  const unsigned lane = threadIdx.x & 31u;
  const std::size_t lo = b * block;
  const std::size_t count = n - lo < block ? n - lo : block;
  const float* rr = HasR ? r : nullptr;
  std::uint32_t m = 0;
  std::size_t base = 0;
  for (; base + 32 * chunk_lanes <= count; base += 32 * chunk_lanes) {
#pragma unroll
    for (int u = 0; u < chunk_lanes; ++u) {
      const std::uint32_t a = kn::magnitude_key(compensated(g, rr, lo + base + 32 * u + lane));
      m = a > m ? a : m;
    }
  }
  for (std::size_t j = base + lane; j < count; j += 32) {
    const std::uint32_t a = kn::magnitude_key(compensated(g, rr, lo + j));
    m = a > m ? a : m;
  }
  m = warp_max(m);
  if (lane == 0) scales[b] = ringflow::detail::bits_float(m);
}

// (b2) quantize c = g + r with given scales and levels; r = c - q * step.
template <bool HasR>
__global__ void __launch_bounds__(cta_threads)
    int8_quantize_kernel(const float* __restrict__ g, float* __restrict__ r, std::size_t n,
                         std::size_t block, std::size_t nb, const float* __restrict__ scales,
                         int levels, std::uint64_t key, std::int8_t* __restrict__ q) {
  const std::size_t b = static_cast<std::size_t>(blockIdx.x) * warps_per_cta + threadIdx.x / 32;
  if (b >= nb) return;
  const unsigned lane = threadIdx.x & 31u;
  const std::size_t lo = b * block;
  const std::size_t count = n - lo < block ? n - lo : block;
  const float scale = scales[b];
  const kn::quantize_int8 quant{kn::int8_inv_step(scale, levels), levels, key};
  const float step = kn::int8_step(scale, levels);
  const float* rr = HasR ? r : nullptr;
  auto one = [&](std::size_t i, float c, std::uint64_t st) {
    const float sent = quantize_store(quant, step, c, st, q + i);
    if constexpr (HasR) r[i] = kn::ef_residual{}(c, sent);
  };
  std::uint64_t st = key + (lo + lane) * kn::golden_gamma;  // state of element lo + base + lane
  std::size_t base = 0;
  for (; base + 32 * chunk_lanes <= count; base += 32 * chunk_lanes) {
    float c[chunk_lanes];
#pragma unroll
    for (int u = 0; u < chunk_lanes; ++u) c[u] = compensated(g, rr, lo + base + 32 * u + lane);
#pragma unroll
    for (int u = 0; u < chunk_lanes; ++u) {
      one(lo + base + 32 * u + lane, c[u], st + u * lane_step);
    }
    st += chunk_lanes * lane_step;
  }
  for (std::size_t j = base + lane; j < count; j += 32, st += lane_step) {
    one(lo + j, compensated(g, rr, lo + j), st);
  }
}

// out (+)= q * step, then / divide_by (overwrite form only).
template <bool Accumulate>
__global__ void __launch_bounds__(cta_threads)
    int8_decode_kernel(const std::int8_t* __restrict__ q, const float* __restrict__ scales,
                       std::size_t n, std::size_t block, std::size_t nb, int levels,
                       float* __restrict__ out, int divide_by) {
  const std::size_t b = static_cast<std::size_t>(blockIdx.x) * warps_per_cta + threadIdx.x / 32;
  if (b >= nb) return;
  const unsigned lane = threadIdx.x & 31u;
  const std::size_t lo = b * block;
  const std::size_t count = n - lo < block ? n - lo : block;
  const kn::dequantize_int8 deq{kn::int8_step(scales[b], levels)};
  auto one = [&](std::int8_t v, float o) {
    const float t = deq(v);
    if constexpr (Accumulate) {
      return o + t;
    } else {
      return divide_by > 1 ? t / static_cast<float>(divide_by) : t;
    }
  };
  std::size_t base = 0;
  for (; base + 32 * chunk_lanes <= count; base += 32 * chunk_lanes) {
    std::int8_t v[chunk_lanes];
    float o[chunk_lanes];
#pragma unroll
    for (int u = 0; u < chunk_lanes; ++u) {
      const std::size_t i = lo + base + 32 * u + lane;
      v[u] = q[i];
      o[u] = Accumulate ? out[i] : 0.0f;
    }
#pragma unroll
    for (int u = 0; u < chunk_lanes; ++u) out[lo + base + 32 * u + lane] = one(v[u], o[u]);
  }
  for (std::size_t j = base + lane; j < count; j += 32) {
    out[lo + j] = one(q[lo + j], Accumulate ? out[lo + j] : 0.0f);
  }
}

// The same decode with 8 consecutive elements per lane: one 8-byte load of q
// and two 16-byte accesses of out instead of eight 1-byte loads and eight
// 4-byte accesses. Needs block % 8 == 0, q 8-byte and out 16-byte aligned.
template <bool Accumulate>
__global__ void __launch_bounds__(cta_threads)
    int8_decode_vec_kernel(const std::int8_t* __restrict__ q, const float* __restrict__ scales,
                           std::size_t n, std::size_t block, std::size_t nb, int levels,
                           float* __restrict__ out, int divide_by) {
  const std::size_t b = static_cast<std::size_t>(blockIdx.x) * warps_per_cta + threadIdx.x / 32;
  if (b >= nb) return;
  const unsigned lane = threadIdx.x & 31u;
  const std::size_t lo = b * block;
  const std::size_t count = n - lo < block ? n - lo : block;
  const std::size_t whole = count / 8 * 8;
  const kn::dequantize_int8 deq{kn::int8_step(scales[b], levels)};
  auto one = [&](std::int8_t v, float o) {
    const float t = deq(v);
    if constexpr (Accumulate) {
      return o + t;
    } else {
      return divide_by > 1 ? t / static_cast<float>(divide_by) : t;
    }
  };
  for (std::size_t e = 8 * static_cast<std::size_t>(lane); e < whole; e += 256) {
    const uint2 raw = *reinterpret_cast<const uint2*>(q + lo + e);
    auto* o4 = reinterpret_cast<float4*>(out + lo + e);
    float o[8] = {};
    if constexpr (Accumulate) {
      const float4 a = o4[0], c = o4[1];
      o[0] = a.x, o[1] = a.y, o[2] = a.z, o[3] = a.w, o[4] = c.x, o[5] = c.y, o[6] = c.z,
      o[7] = c.w;
    }
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const std::uint32_t word = k < 4 ? raw.x : raw.y;
      const auto v = static_cast<std::int8_t>(static_cast<std::uint8_t>(word >> (8 * (k % 4))));
      o[k] = one(v, o[k]);
    }
    o4[0] = make_float4(o[0], o[1], o[2], o[3]);
    o4[1] = make_float4(o[4], o[5], o[6], o[7]);
  }
  for (std::size_t j = whole + lane; j < count; j += 32) {
    out[lo + j] = one(q[lo + j], Accumulate ? out[lo + j] : 0.0f);
  }
}

template <bool Accumulate>
void launch_decode(const std::int8_t* q, const float* scales, std::size_t n, std::size_t block,
                   int levels, float* out, int divide_by, cudaStream_t s) {
  const std::size_t nb = block_count(n, block);
  if (block % 8 == 0 && aligned(q, 8) && aligned(out, 16)) {
    int8_decode_vec_kernel<Accumulate><<<ctas_for_warps(nb), cta_threads, 0, s>>>(
        q, scales, n, block, nb, levels, out, divide_by);
  } else {
    int8_decode_kernel<Accumulate><<<ctas_for_warps(nb), cta_threads, 0, s>>>(
        q, scales, n, block, nb, levels, out, divide_by);
  }
  RINGFLOW_CHECK_LAUNCH("int8_decode_kernel");
}

void check_block(std::size_t block, const char* what) {
  require(block > 0, what, "block must be >= 1 element, got 0");
}

void check_levels(int levels, const char* what) {
  require(levels >= 1 && levels <= 127, what,
          "levels must be in [1, 127] (127 / ranks), got " + std::to_string(levels));
}

}  // namespace

void int8_ef_encode(const float* grad, float* residual, std::size_t n, std::size_t block,
                    std::uint64_t key, float* scales, std::int8_t* q, cudaStream_t s) {
  check_block(block, "cuda::int8_ef_encode");
  if (n == 0) return;
  const std::size_t nb = block_count(n, block);
  const unsigned grid = ctas_for_warps(nb);
  dispatch_lanes(block, [&](auto pl) {
    constexpr int PL = decltype(pl)::value;
    if constexpr (PL == 0) {
      if (residual) {
        int8_encode_stream_kernel<true>
            <<<grid, cta_threads, 0, s>>>(grad, residual, n, block, nb, key, scales, q);
      } else {
        int8_encode_stream_kernel<false>
            <<<grid, cta_threads, 0, s>>>(grad, residual, n, block, nb, key, scales, q);
      }
    } else {
      const auto blk = static_cast<unsigned>(block);
      if (residual) {
        int8_encode_kernel<PL, true>
            <<<grid, cta_threads, 0, s>>>(grad, residual, n, blk, nb, key, scales, q);
      } else {
        int8_encode_kernel<PL, false>
            <<<grid, cta_threads, 0, s>>>(grad, residual, n, blk, nb, key, scales, q);
      }
    }
  });
  RINGFLOW_CHECK_LAUNCH("int8_encode_kernel");
}

void int8_block_absmax(const float* grad, const float* residual, std::size_t n, std::size_t block,
                       float* scales, cudaStream_t s) {
  check_block(block, "cuda::int8_block_absmax");
  if (n == 0) return;
  const std::size_t nb = block_count(n, block);
  if (residual) {
    int8_absmax_kernel<true>
        <<<ctas_for_warps(nb), cta_threads, 0, s>>>(grad, residual, n, block, nb, scales);
  } else {
    int8_absmax_kernel<false>
        <<<ctas_for_warps(nb), cta_threads, 0, s>>>(grad, residual, n, block, nb, scales);
  }
  RINGFLOW_CHECK_LAUNCH("int8_absmax_kernel");
}

void int8_ef_quantize(const float* grad, float* residual, std::size_t n, std::size_t block,
                      const float* scales, int levels, std::uint64_t key, std::int8_t* q,
                      cudaStream_t s) {
  check_block(block, "cuda::int8_ef_quantize");
  check_levels(levels, "cuda::int8_ef_quantize");
  if (n == 0) return;
  const std::size_t nb = block_count(n, block);
  if (residual) {
    int8_quantize_kernel<true><<<ctas_for_warps(nb), cta_threads, 0, s>>>(
        grad, residual, n, block, nb, scales, levels, key, q);
  } else {
    int8_quantize_kernel<false><<<ctas_for_warps(nb), cta_threads, 0, s>>>(
        grad, residual, n, block, nb, scales, levels, key, q);
  }
  RINGFLOW_CHECK_LAUNCH("int8_quantize_kernel");
}

void int8_decode_add(const std::int8_t* q, const float* scales, std::size_t n, std::size_t block,
                     int levels, float* out, cudaStream_t s) {
  check_block(block, "cuda::int8_decode_add");
  check_levels(levels, "cuda::int8_decode_add");
  if (n == 0) return;
  launch_decode<true>(q, scales, n, block, levels, out, 1, s);
}

void int8_decode(const std::int8_t* q, const float* scales, std::size_t n, std::size_t block,
                 int levels, float* out, int divide_by, cudaStream_t s) {
  check_block(block, "cuda::int8_decode");
  check_levels(levels, "cuda::int8_decode");
  if (n == 0) return;
  launch_decode<false>(q, scales, n, block, levels, out, divide_by, s);
}

}  // namespace ringflow::cuda
