// Fused top-k by magnitude with error feedback (ringflow/cuda/compress.hpp).
//
// The kept set is the k largest of c = g + r under the CPU's strict order
// (larger kernels::magnitude_key first, then the lower index), which is unique,
// so any exact method gives the CPU's set. Every step is queued on the stream
// with no host synchronization: the data-dependent sizes (how many candidates
// passed, whether to fall back) live in a small device state that each kernel
// reads, and kernels with nothing to do return at once.
//
//   0. memset: the state, two bitmaps of n bits
//   1. sample (1 CTA, large tensors only): the CPU's threshold from 8192
//      seeded samples, aiming at 2k candidates
//   2. pass 1 (the only full pass over g and r): c = g + r, r = c, and the
//      candidates (index, c) with key >= threshold appended per CTA step
//   3. exact radix select of the k-th key among the candidates (or among all
//      n elements if too few passed or the candidate buffer overflowed, and
//      always for small tensors): three 11/11/10-bit histogram rounds, each
//      followed by a one-CTA pick of the digit
//   4. mark: bitmap `sel` for keys above the k-th, `tie` for keys equal to it
//   5. ordered output from the bitmaps (n/16 bytes, not n*4): per-tile
//      counts, one scan, and a write kernel that emits indices in increasing
//      order; the ties taken are the lowest-index ones; the kept values are
//      read back from r (which holds c) and r is set to c - (0 + c) there.
//
// Bytes per element: g, r read and r written once (12), the bitmaps (n/4
// bytes set, written by the marks and read twice), and about 16 bytes per
// candidate (~2k of them) plus k random reads and writes of r.
#include <cuda_runtime.h>

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <type_traits>

#include "compress_common.cuh"
#include "ringflow/cuda/compress.hpp"

namespace ringflow::cuda {

namespace {

using namespace compress_detail;

constexpr int radix_rounds = 3;
__constant__ unsigned c_radix_shift[radix_rounds] = {21, 10, 0};
__constant__ unsigned c_radix_bits[radix_rounds] = {11, 11, 10};
constexpr unsigned max_bins = 2048;
constexpr unsigned sample_count = 8192;   // the CPU's m
constexpr std::size_t tile_words = 1024;  // bitmap words per output tile
constexpr int words_per_thread = static_cast<int>(tile_words) / cta_threads;
constexpr int pass1_quads = 4;  // float4 groups per thread per pass-1 step
constexpr std::size_t pass1_tile = static_cast<std::size_t>(cta_threads) * 4 * pass1_quads;
constexpr unsigned select_ctas = 1024;  // grid of the histogram and mark kernels
constexpr int scan_threads = 512;       // the one CTA of the tile scan

struct topk_state {
  std::uint32_t threshold;   // sampled threshold key
  std::uint32_t cand_count;  // candidates that passed (may exceed the capacity)
  std::uint32_t prefix;      // radix select: the digits chosen so far (the k-th key at the end)
  std::uint32_t remaining;   // rank wanted inside the chosen bin (ties to take at the end)
  std::uint32_t greater;     // elements known to be above the k-th key
  std::uint32_t pad[3];
  std::uint32_t hist[radix_rounds][max_bins];
};

struct layout {
  std::size_t cap = 0, nwords = 0, ntiles = 0;
  std::size_t sel = 0, tie = 0, zero_bytes = 0, cand_idx = 0, cand_val = 0, tile_counts = 0,
              tile_offsets = 0, total = 0;
};

constexpr std::size_t align_up(std::size_t x) { return (x + 255) / 256 * 256; }

layout layout_of(std::size_t n, std::size_t k) {
  layout l;
  // The CPU aims at 2k candidates; 4k + 64Ki leaves room for the sampling
  // noise (8192 samples: the estimated quantile is off by ~10%). With
  // 4k >= n the selection is always exact over all elements: no candidates.
  l.cap = 4 * k >= n ? 0 : std::min(n, 4 * k + 65536);
  l.nwords = (n + 31) / 32;
  l.ntiles = (l.nwords + tile_words - 1) / tile_words;
  std::size_t at = align_up(sizeof(topk_state));
  l.sel = at;
  at += align_up(4 * l.nwords);
  l.tie = at;
  at += align_up(4 * l.nwords);
  l.zero_bytes = at;  // state and both bitmaps: cleared by one memset per call
  l.cand_idx = at;
  at += align_up(4 * l.cap);
  l.cand_val = at;
  at += align_up(4 * l.cap);
  l.tile_counts = at;
  at += align_up(8 * l.ntiles);
  l.tile_offsets = at;
  at += align_up(8 * l.ntiles);
  l.total = at;
  return l;
}

// Where the selection looks: the candidates, or all n elements (c read back
// from r, or g without error feedback).
struct source {
  const std::uint32_t* cand_idx;
  const float* cand_val;
  const float* all;  // c of every element
  std::size_t n;
  std::uint32_t cap;
  std::uint32_t k;
  bool exact;

  __device__ bool use_all(const topk_state& st) const {
    return exact || st.cand_count < k || st.cand_count > cap;
  }
};

/// Called by all cta_threads threads: the bin (scanning from the highest) in
/// which the rem-th largest of the counted keys falls, and how many counted
/// keys lie in higher bins. 1 <= rem <= sum of hist[0..nbins).
struct pick_result {
  std::uint32_t bin, above;
};
__device__ pick_result pick_bin(const std::uint32_t* hist, unsigned nbins, std::uint32_t rem) {
  using scan_t = cub::BlockScan<std::uint32_t, cta_threads>;
  __shared__ typename scan_t::TempStorage scan_tmp;
  __shared__ pick_result result;
  const unsigned per = nbins / cta_threads;            // 8 or 4
  const unsigned top = nbins - 1 - threadIdx.x * per;  // this thread: bins top, top-1, ...
  std::uint32_t sum = 0;
  for (unsigned i = 0; i < per; ++i) sum += hist[top - i];
  if (threadIdx.x == 0) result = pick_result{0, 0};
  std::uint32_t before = 0;
  scan_t(scan_tmp).ExclusiveSum(sum, before);
  __syncthreads();  // result initialized before the one writer below
  if (before < rem && rem <= before + sum) {
    std::uint32_t cum = before;
    for (unsigned i = 0; i < per; ++i) {
      const std::uint32_t h = hist[top - i];
      if (cum + h >= rem) {
        result = pick_result{top - i, cum};
        break;
      }
      cum += h;
    }
  }
  __syncthreads();
  const pick_result r = result;
  __syncthreads();  // result may be reused by the caller's next call
  return r;
}

__device__ __forceinline__ std::uint32_t round_mask(int round) {
  return round == 0 ? 0u : ~0u << c_radix_shift[round - 1];
}
__device__ __forceinline__ std::uint32_t digit_of(std::uint32_t key, int round) {
  return (key >> c_radix_shift[round]) & ((1u << c_radix_bits[round]) - 1u);
}

// 1. The CPU's sampled threshold: the (pos + 1)-th largest of 8192 keys.
template <bool HasR>
__global__ void __launch_bounds__(cta_threads)
    topk_sample_kernel(const float* __restrict__ g, const float* __restrict__ r, std::size_t n,
                       std::uint64_t key, std::uint32_t rank, topk_state* st) {
  __shared__ std::uint32_t keys[sample_count];
  __shared__ std::uint32_t hist[max_bins];
  const float fn = static_cast<float>(n);
  // All 2 x 32 random loads of a thread are issued before the first use: one
  // memory latency for the whole sample instead of 32 in a row.
  constexpr int per = sample_count / cta_threads;
  float gv[per], rv[per];
#pragma unroll
  for (int u = 0; u < per; ++u) {
    const unsigned j = threadIdx.x + u * cta_threads;
    auto i = static_cast<std::size_t>(kn::mul_rn(kn::uniform01(key, j), fn));
    i = i < n - 1 ? i : n - 1;
    gv[u] = g[i];
    rv[u] = HasR ? r[i] : 0.0f;
  }
#pragma unroll
  for (int u = 0; u < per; ++u) {
    const float c = HasR ? kn::ef_compensate{}(gv[u], rv[u]) : gv[u];
    keys[threadIdx.x + u * cta_threads] = kn::magnitude_key(c);
  }
  std::uint32_t prefix = 0, rem = rank;
  for (int round = 0; round < radix_rounds; ++round) {
    const unsigned nbins = 1u << c_radix_bits[round];
    for (unsigned b = threadIdx.x; b < nbins; b += cta_threads) hist[b] = 0;
    __syncthreads();
    const std::uint32_t mask = round_mask(round);
    for (unsigned j = threadIdx.x; j < sample_count; j += cta_threads) {
      if ((keys[j] & mask) == prefix) atomicAdd(&hist[digit_of(keys[j], round)], 1u);
    }
    __syncthreads();
    const pick_result p = pick_bin(hist, nbins, rem);
    prefix |= p.bin << c_radix_shift[round];
    rem -= p.above;
  }
  if (threadIdx.x == 0) st->threshold = prefix;
}

// 2. c = g + r, r = c; candidates with key >= threshold appended (Sampled).
template <bool HasR, bool Sampled, bool Vec>
__global__ void __launch_bounds__(cta_threads)
    topk_pass1_kernel(const float* __restrict__ g, float* __restrict__ r, std::size_t n,
                      topk_state* st, std::uint32_t cap, std::uint32_t* __restrict__ cand_idx,
                      float* __restrict__ cand_val) {
  using scan_t = cub::BlockScan<std::uint32_t, cta_threads>;
  __shared__ typename scan_t::TempStorage scan_tmp;
  __shared__ std::uint32_t base_sh;
  std::uint32_t threshold = 0;
  if constexpr (Sampled) threshold = st->threshold;
  constexpr int per = 4 * pass1_quads;
  for (std::size_t lo = static_cast<std::size_t>(blockIdx.x) * pass1_tile; lo < n;
       lo += static_cast<std::size_t>(gridDim.x) * pass1_tile) {
    float c[per];
    // Element e of this thread: lo + q * (4 * cta_threads) + 4 * tid + j.
    auto elem = [&](int q, int j) {
      return lo + static_cast<std::size_t>(q) * 4 * cta_threads + 4 * threadIdx.x + j;
    };
    if (Vec && lo + pass1_tile <= n) {
#pragma unroll
      for (int q = 0; q < pass1_quads; ++q) {
        const std::size_t e = elem(q, 0);
        const float4 gv = *reinterpret_cast<const float4*>(g + e);
        float4 cv = gv;
        if constexpr (HasR) {
          const float4 rv = *reinterpret_cast<const float4*>(r + e);
          const kn::ef_compensate comp;
          cv = make_float4(comp(gv.x, rv.x), comp(gv.y, rv.y), comp(gv.z, rv.z), comp(gv.w, rv.w));
          *reinterpret_cast<float4*>(r + e) = cv;
        }
        c[4 * q] = cv.x;
        c[4 * q + 1] = cv.y;
        c[4 * q + 2] = cv.z;
        c[4 * q + 3] = cv.w;
      }
    } else {
#pragma unroll
      for (int q = 0; q < pass1_quads; ++q) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const std::size_t e = elem(q, j);
          c[4 * q + j] = 0.0f;
          if (e < n) {
            if constexpr (HasR) {
              c[4 * q + j] = kn::ef_compensate{}(g[e], r[e]);
              r[e] = c[4 * q + j];
            } else {
              c[4 * q + j] = g[e];
            }
          }
        }
      }
    }
    if constexpr (Sampled) {
      std::uint32_t mask = 0;
#pragma unroll
      for (int q = 0; q < pass1_quads; ++q) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const bool pass = elem(q, j) < n && kn::magnitude_key(c[4 * q + j]) >= threshold;
          mask |= static_cast<std::uint32_t>(pass) << (4 * q + j);
        }
      }
      std::uint32_t offset = 0, total = 0;
      scan_t(scan_tmp).ExclusiveSum(static_cast<std::uint32_t>(__popc(mask)), offset, total);
      if (threadIdx.x == 0) base_sh = total ? atomicAdd(&st->cand_count, total) : 0u;
      __syncthreads();
      std::uint32_t pos = base_sh + offset;
      // Unrolled with constant indices: indexing c[] by a run-time bit would
      // move the array to local memory.
#pragma unroll
      for (int bit = 0; bit < per; ++bit) {
        if ((mask >> bit) & 1u) {
          if (pos < cap) {
            cand_idx[pos] = static_cast<std::uint32_t>(elem(bit / 4, bit % 4));
            cand_val[pos] = c[bit];
          }
          ++pos;
        }
      }
      __syncthreads();  // scan_tmp and base_sh are reused by the next step
    }
  }
}

// 3a. Histogram of one radix round over the source.
__global__ void __launch_bounds__(cta_threads)
    topk_hist_kernel(source src, topk_state* st, int round) {
  __shared__ std::uint32_t hist[max_bins];
  const unsigned nbins = 1u << c_radix_bits[round];
  for (unsigned b = threadIdx.x; b < nbins; b += cta_threads) hist[b] = 0;
  __syncthreads();
  const bool all = src.use_all(*st);
  const std::size_t count = all ? src.n : st->cand_count;
  const std::uint32_t mask = round_mask(round), prefix = st->prefix;
  const std::size_t stride = static_cast<std::size_t>(gridDim.x) * blockDim.x;
  const unsigned lane = threadIdx.x & 31u;
  // Whole warps iterate together, and lanes with the same digit add once
  // (__match_any_sync): gradients full of equal values (exact zeros, say)
  // would otherwise serialize 32 shared atomics on one bin.
  for (std::size_t base = static_cast<std::size_t>(blockIdx.x) * blockDim.x + (threadIdx.x - lane);
       base < count; base += stride) {
    const std::size_t j = base + lane;
    std::uint32_t d = ~0u;  // no bin
    if (j < count) {
      const std::uint32_t key = kn::magnitude_key(all ? src.all[j] : src.cand_val[j]);
      if ((key & mask) == prefix) d = digit_of(key, round);
    }
    const std::uint32_t peers = __match_any_sync(full_mask, d);
    if (d != ~0u && lane == static_cast<unsigned>(__ffs(peers) - 1)) {
      atomicAdd(&hist[d], static_cast<std::uint32_t>(__popc(peers)));
    }
  }
  __syncthreads();
  for (unsigned b = threadIdx.x; b < nbins; b += cta_threads) {
    if (hist[b]) atomicAdd(&st->hist[round][b], hist[b]);
  }
}

// 3b. One CTA: the digit of this round.
__global__ void __launch_bounds__(cta_threads)
    topk_pick_kernel(topk_state* st, int round, std::uint32_t k) {
  const std::uint32_t rem = round == 0 ? k : st->remaining;
  const pick_result p = pick_bin(st->hist[round], 1u << c_radix_bits[round], rem);
  if (threadIdx.x == 0) {
    st->prefix |= p.bin << c_radix_shift[round];
    st->greater += p.above;
    st->remaining = rem - p.above;
  }
}

// 4. Marks: sel for keys above the k-th, tie for keys equal to it.
__global__ void __launch_bounds__(cta_threads)
    topk_mark_kernel(source src, const topk_state* st, std::uint32_t* __restrict__ sel,
                     std::uint32_t* __restrict__ tie) {
  const std::uint32_t kth = st->prefix;
  if (src.use_all(*st)) {
    // Warp w owns whole bitmap words: plain stores, no atomics.
    const std::size_t warps = static_cast<std::size_t>(gridDim.x) * warps_per_cta;
    const unsigned lane = threadIdx.x & 31u;
    for (std::size_t w = static_cast<std::size_t>(blockIdx.x) * warps_per_cta + threadIdx.x / 32;
         32 * w < src.n; w += warps) {
      const std::size_t i = 32 * w + lane;
      const std::uint32_t key = i < src.n ? kn::magnitude_key(src.all[i]) : 0u;
      const bool in = i < src.n;
      const std::uint32_t above = __ballot_sync(full_mask, in && key > kth);
      const std::uint32_t equal = __ballot_sync(full_mask, in && key == kth);
      if (lane == 0) {
        sel[w] = above;
        tie[w] = equal;
      }
    }
    return;
  }
  const std::size_t count = st->cand_count;
  const std::size_t stride = static_cast<std::size_t>(gridDim.x) * blockDim.x;
  for (std::size_t j = static_cast<std::size_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < count;
       j += stride) {
    const std::uint32_t key = kn::magnitude_key(src.cand_val[j]);
    if (key < kth) continue;
    const std::uint32_t i = src.cand_idx[j];
    atomicOr(key > kth ? &sel[i / 32] : &tie[i / 32], 1u << (i % 32));
  }
}

// 5a. Per tile: (sel count << 32) | tie count.
__global__ void __launch_bounds__(cta_threads)
    topk_tile_count_kernel(const std::uint32_t* __restrict__ sel,
                           const std::uint32_t* __restrict__ tie, std::size_t nwords,
                           std::uint64_t* __restrict__ tile_counts) {
  using reduce_t = cub::BlockReduce<std::uint64_t, cta_threads>;
  __shared__ typename reduce_t::TempStorage tmp;
  std::uint64_t local = 0;
  const std::size_t w0 =
      blockIdx.x * tile_words + static_cast<std::size_t>(threadIdx.x) * words_per_thread;
#pragma unroll
  for (int i = 0; i < words_per_thread; ++i) {
    if (w0 + i < nwords) {
      local += (static_cast<std::uint64_t>(__popc(sel[w0 + i])) << 32) |
               static_cast<std::uint64_t>(__popc(tie[w0 + i]));
    }
  }
  const std::uint64_t total = reduce_t(tmp).Sum(local);
  if (threadIdx.x == 0) tile_counts[blockIdx.x] = total;
}

// 5b. One CTA: exclusive prefix of the tile counts (both halves at once: the
// tie half never carries, its total is at most n < 2^32).
__global__ void __launch_bounds__(scan_threads)
    topk_tile_scan_kernel(const std::uint64_t* __restrict__ tile_counts, std::size_t ntiles,
                          std::uint64_t* __restrict__ tile_offsets) {
  using scan_t = cub::BlockScan<std::uint64_t, scan_threads>;
  __shared__ typename scan_t::TempStorage tmp;
  std::uint64_t carry = 0;
  for (std::size_t lo = 0; lo < ntiles; lo += scan_threads) {
    const std::size_t t = lo + threadIdx.x;
    const std::uint64_t v = t < ntiles ? tile_counts[t] : 0;
    std::uint64_t before = 0, total = 0;
    scan_t(tmp).ExclusiveSum(v, before, total);
    if (t < ntiles) tile_offsets[t] = carry + before;
    carry += total;
    __syncthreads();
  }
}

// 5c. Ordered output. The position of a kept element is (#sel before it) +
// min(#ties before it, need): the ties kept are the `need` lowest-index ones.
template <bool HasR>
__global__ void __launch_bounds__(cta_threads)
    topk_write_kernel(const std::uint32_t* __restrict__ sel, const std::uint32_t* __restrict__ tie,
                      std::size_t nwords, const std::uint64_t* __restrict__ tile_offsets,
                      const topk_state* st, const float* cvals, float* r,
                      std::uint32_t* __restrict__ indices, float* __restrict__ values) {
  using scan_t = cub::BlockScan<std::uint64_t, cta_threads>;
  __shared__ typename scan_t::TempStorage tmp;
  const std::uint32_t need = st->remaining;
  const std::size_t w0 =
      blockIdx.x * tile_words + static_cast<std::size_t>(threadIdx.x) * words_per_thread;
  std::uint32_t s_words[words_per_thread], t_words[words_per_thread];
  std::uint64_t local = 0;
#pragma unroll
  for (int i = 0; i < words_per_thread; ++i) {
    const bool in = w0 + i < nwords;
    s_words[i] = in ? sel[w0 + i] : 0u;
    t_words[i] = in ? tie[w0 + i] : 0u;
    local += (static_cast<std::uint64_t>(__popc(s_words[i])) << 32) |
             static_cast<std::uint64_t>(__popc(t_words[i]));
  }
  std::uint64_t before = 0;
  scan_t(tmp).ExclusiveSum(local, before);
  before += tile_offsets[blockIdx.x];
  auto s_before = static_cast<std::uint32_t>(before >> 32);
  auto t_before = static_cast<std::uint32_t>(before & 0xffffffffu);
#pragma unroll
  for (int i = 0; i < words_per_thread; ++i) {
    std::uint32_t bits = s_words[i] | t_words[i];
    while (bits) {
      const int b = __ffs(bits) - 1;
      bits &= bits - 1;
      std::uint32_t pos;
      if ((s_words[i] >> b) & 1u) {
        pos = s_before + (t_before < need ? t_before : need);
        ++s_before;
      } else {
        const bool take = t_before < need;
        pos = s_before + t_before;
        ++t_before;
        if (!take) continue;
      }
      const std::size_t e = (w0 + i) * 32 + static_cast<std::size_t>(b);
      const float v = cvals[e];
      indices[pos] = static_cast<std::uint32_t>(e);
      values[pos] = v;
      // The CPU decodes its payload into zeros (mine = 0 + v) and keeps c - mine.
      if constexpr (HasR) r[e] = kn::ef_residual{}(v, 0.0f + v);
    }
  }
}

__global__ void __launch_bounds__(cta_threads)
    topk_decode_kernel(const std::uint32_t* __restrict__ indices, const float* __restrict__ values,
                       std::size_t k, std::size_t n, float* __restrict__ out) {
  const std::size_t stride = static_cast<std::size_t>(gridDim.x) * blockDim.x;
  for (std::size_t j = static_cast<std::size_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < k;
       j += stride) {
    const std::uint32_t i = indices[j];
    if (i < n) out[i] = out[i] + values[j];
  }
}

}  // namespace

std::size_t topk_workspace_bytes(std::size_t n, std::size_t k) { return layout_of(n, k).total; }

void topk_ef_encode(const float* grad, float* residual, std::size_t n, std::size_t k,
                    std::uint64_t key, std::uint32_t* indices, float* values, void* workspace,
                    std::size_t workspace_bytes, cudaStream_t s, std::size_t exact_limit) {
  const char* what = "cuda::topk_ef_encode";
  if (n == 0) return;
  require(k >= 1 && k <= n, what,
          "k must be in [1, n], got k = " + std::to_string(k) + " for n = " + std::to_string(n));
  require(n <= 0xffffffffu, what, std::to_string(n) + " elements exceed the uint32 index range");
  const layout l = layout_of(n, k);
  require(workspace_bytes >= l.total, what,
          "workspace has " + std::to_string(workspace_bytes) + " bytes, topk_workspace_bytes(" +
              std::to_string(n) + ", " + std::to_string(k) + ") = " + std::to_string(l.total));
  require(aligned(workspace, 16), what, "workspace must be 16-byte aligned");
  auto* ws = static_cast<unsigned char*>(workspace);
  auto* st = reinterpret_cast<topk_state*>(ws);
  auto* sel = reinterpret_cast<std::uint32_t*>(ws + l.sel);
  auto* tie = reinterpret_cast<std::uint32_t*>(ws + l.tie);
  auto* cand_idx = reinterpret_cast<std::uint32_t*>(ws + l.cand_idx);
  auto* cand_val = reinterpret_cast<float*>(ws + l.cand_val);
  auto* tile_counts = reinterpret_cast<std::uint64_t*>(ws + l.tile_counts);
  auto* tile_offsets = reinterpret_cast<std::uint64_t*>(ws + l.tile_offsets);
  const bool exact = n <= exact_limit || 4 * k >= n;
  const bool has_r = residual != nullptr;

  RINGFLOW_CHECK_CUDA(cudaMemsetAsync(ws, 0, l.zero_bytes, s));
  if (!exact) {
    // The CPU's sample rank: pos = floor(2k/n * m) (0-based, descending).
    const double want = 2.0 * static_cast<double>(k) / static_cast<double>(n);
    const auto pos = static_cast<std::uint32_t>(want * static_cast<double>(sample_count));
    if (has_r) {
      topk_sample_kernel<true><<<1, cta_threads, 0, s>>>(grad, residual, n, key, pos + 1, st);
    } else {
      topk_sample_kernel<false><<<1, cta_threads, 0, s>>>(grad, residual, n, key, pos + 1, st);
    }
    RINGFLOW_CHECK_LAUNCH("topk_sample_kernel");
  }
  if (has_r || !exact) {
    const bool vec = aligned(grad, 16) && (!has_r || aligned(residual, 16));
    const unsigned grid =
        static_cast<unsigned>(std::clamp<std::size_t>((n + pass1_tile - 1) / pass1_tile, 1, 4096));
    const auto cap = static_cast<std::uint32_t>(l.cap);
    auto launch = [&](auto hr, auto sampled) {
      constexpr bool HR = decltype(hr)::value, SA = decltype(sampled)::value;
      if (vec) {
        topk_pass1_kernel<HR, SA, true>
            <<<grid, cta_threads, 0, s>>>(grad, residual, n, st, cap, cand_idx, cand_val);
      } else {
        topk_pass1_kernel<HR, SA, false>
            <<<grid, cta_threads, 0, s>>>(grad, residual, n, st, cap, cand_idx, cand_val);
      }
    };
    using yes = std::true_type;
    using no = std::false_type;
    if (has_r && !exact) launch(yes{}, yes{});
    if (has_r && exact) launch(yes{}, no{});
    if (!has_r) launch(no{}, yes{});
    RINGFLOW_CHECK_LAUNCH("topk_pass1_kernel");
  }
  const source src{cand_idx,
                   cand_val,
                   has_r ? residual : grad,
                   n,
                   static_cast<std::uint32_t>(l.cap),
                   static_cast<std::uint32_t>(k),
                   exact};
  const unsigned sgrid = std::min<unsigned>(select_ctas, ctas_for_items(n, 4));
  for (int round = 0; round < radix_rounds; ++round) {
    topk_hist_kernel<<<sgrid, cta_threads, 0, s>>>(src, st, round);
    RINGFLOW_CHECK_LAUNCH("topk_hist_kernel");
    topk_pick_kernel<<<1, cta_threads, 0, s>>>(st, round, static_cast<std::uint32_t>(k));
    RINGFLOW_CHECK_LAUNCH("topk_pick_kernel");
  }
  topk_mark_kernel<<<sgrid, cta_threads, 0, s>>>(src, st, sel, tie);
  RINGFLOW_CHECK_LAUNCH("topk_mark_kernel");
  const auto ntiles = static_cast<unsigned>(l.ntiles);
  topk_tile_count_kernel<<<ntiles, cta_threads, 0, s>>>(sel, tie, l.nwords, tile_counts);
  RINGFLOW_CHECK_LAUNCH("topk_tile_count_kernel");
  topk_tile_scan_kernel<<<1, scan_threads, 0, s>>>(tile_counts, l.ntiles, tile_offsets);
  RINGFLOW_CHECK_LAUNCH("topk_tile_scan_kernel");
  if (has_r) {
    topk_write_kernel<true><<<ntiles, cta_threads, 0, s>>>(sel, tie, l.nwords, tile_offsets, st,
                                                           residual, residual, indices, values);
  } else {
    topk_write_kernel<false><<<ntiles, cta_threads, 0, s>>>(sel, tie, l.nwords, tile_offsets, st,
                                                            grad, residual, indices, values);
  }
  RINGFLOW_CHECK_LAUNCH("topk_write_kernel");
}

void topk_decode_add(const std::uint32_t* indices, const float* values, std::size_t k,
                     std::size_t n, float* out, cudaStream_t s) {
  if (k == 0) return;
  topk_decode_kernel<<<ctas_for_items(k, 4), cta_threads, 0, s>>>(indices, values, k, n, out);
  RINGFLOW_CHECK_LAUNCH("topk_decode_kernel");
}

}  // namespace ringflow::cuda
