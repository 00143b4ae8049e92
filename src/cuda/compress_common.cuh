// Shared by the fused compression kernels (src/cuda/compress_*.cu): launch
// geometry, argument checks and warp helpers. Device-side only includes: no
// fmt, no logging (nvcc cannot compile fmt).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>

#include "ringflow/compress/kernels.hpp"
#include "ringflow/core/error.hpp"
#include "ringflow/cuda/check.hpp"

namespace ringflow::cuda::compress_detail {

namespace kn = ringflow::compress::kernels;

constexpr unsigned full_mask = 0xffffffffu;
constexpr int cta_threads = 256;
constexpr int warps_per_cta = cta_threads / 32;

/// CTAs for one warp per item (a scale block).
inline unsigned ctas_for_warps(std::size_t warps) {
  return static_cast<unsigned>((warps + warps_per_cta - 1) / warps_per_cta);
}

/// CTAs for a grid-stride loop over `items`, each thread taking
/// `per_thread` of them per step: enough to fill any current GPU several times
/// over without launching millions of CTAs that do one item each.
inline unsigned ctas_for_items(std::size_t items, std::size_t per_thread = 1) {
  const std::size_t per_cta = per_thread * cta_threads;
  const std::size_t want = (items + per_cta - 1) / per_cta;
  return static_cast<unsigned>(std::clamp<std::size_t>(want, 1, 8192));
}

inline bool aligned(const void* p, std::size_t bytes) {
  return reinterpret_cast<std::uintptr_t>(p) % bytes == 0;
}

inline void require(bool ok, const char* what, const std::string& detail) {
  if (!ok) throw usage_error(std::string(what) + ": " + detail);
}

/// The elements per lane a one-warp-per-block kernel keeps in registers:
/// the smallest power of two >= ceil(block / 32), or 0 above 32 (then the
/// kernel streams the block twice instead).
inline int lanes_per_block(std::size_t block) {
  const std::size_t per_lane = (block + 31) / 32;
  for (int pl = 1; pl <= 32; pl *= 2) {
    if (per_lane <= static_cast<std::size_t>(pl)) return pl;
  }
  return 0;
}

/// Calls f(std::integral_constant<int, PL>) for PL = lanes_per_block(block)
/// (1, 2, ... 32) or PL = 0 for the streaming variant.
template <class F>
void dispatch_lanes(std::size_t block, F&& f) {
  switch (lanes_per_block(block)) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 8: return f(std::integral_constant<int, 8>{});
    case 16: return f(std::integral_constant<int, 16>{});
    case 32: return f(std::integral_constant<int, 32>{});
    default: return f(std::integral_constant<int, 0>{});
  }
}

/// Elements per lane that the streaming loops of a one-warp-per-block kernel
/// load before using any: full chunks of 32 * chunk_lanes elements run
/// without bound checks, so a lane has that many independent loads in flight
/// (a loop with a check per element issues one load at a time).
constexpr int chunk_lanes = 8;

/// Inverse quantization step, as the CPU's int8 compressor computes it.
__device__ __forceinline__ float inv_step_of(float scale, int levels) {
  return kn::int8_inv_step(scale, levels);
}

/// Warp-wide max of an unsigned value (every lane gets it). Shuffles, not
/// __reduce_max_sync, which needs sm_80 (the build may target sm_75).
__device__ __forceinline__ std::uint32_t warp_max(std::uint32_t v) {
#pragma unroll
  for (int h = 16; h > 0; h >>= 1) {
    const std::uint32_t o = __shfl_xor_sync(full_mask, v, h);
    v = o > v ? o : v;
  }
  return v;
}

/// The canonical fold of kernels::fold_lanes as a butterfly: lane 0 computes
/// lane[l] + lane[l + h] exactly like the CPU loop, and commutativity makes
/// every lane hold the same bits after each step.
__device__ __forceinline__ float warp_fold(float s) {
#pragma unroll
  for (int h = 16; h > 0; h >>= 1) s = s + __shfl_xor_sync(full_mask, s, h);
  return s;
}

}  // namespace ringflow::cuda::compress_detail
