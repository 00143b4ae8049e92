// PowerSGD's device kernels (ringflow/cuda/compress.hpp): the skinny products
// P = M Q and Q = M^T P of a small rank, the orthonormal basis of P by the
// Householder QR that the CPU compressor takes from Eigen (same algorithm,
// same column order, same signs), and the fused decode + residual.
//
// M is the row-major rows x cols view of `size` floats (size < rows * cols
// only for the zero-padded matrix of a bucket without a layout: elements past
// `size` read as 0); P (rows x rank) and Q (cols x rank) are column-major, as
// in the CPU payload. Float sums run in another order than Eigen's, so the
// results agree with the CPU to rounding, not bit for bit.
#include <cuda_runtime.h>

#include <cfloat>

#include "compress_common.cuh"
#include "ringflow/cuda/compress.hpp"

namespace ringflow::cuda {

namespace {

using namespace compress_detail;

// Ranks accumulated per pass over M: a pass keeps this many sums per thread in
// registers; a larger rank reads M again for each further group of 8.
constexpr int rank_chunk = 8;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(full_mask, v, o);
  return v;
}

// Sum over the block, returned to every thread. sh: 33 floats of shared
// memory. Ends with a barrier, so sh can be reused at once.
__device__ float block_sum(float v, float* sh) {
  const unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  v = warp_sum(v);
  if (lane == 0) sh[warp] = v;
  __syncthreads();
  if (warp == 0) {
    float t = lane < blockDim.x / 32 ? sh[lane] : 0.0f;
    t = warp_sum(t);
    if (lane == 0) sh[32] = t;
  }
  __syncthreads();
  const float total = sh[32];
  __syncthreads();
  return total;
}

__global__ void __launch_bounds__(cta_threads)
    init_q_kernel(float* __restrict__ q, std::size_t count, std::uint64_t key) {
  const std::size_t stride = static_cast<std::size_t>(gridDim.x) * blockDim.x;
  for (std::size_t i = static_cast<std::size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += stride) {
    q[i] = kn::uniform01(key, i) - 0.5f;
  }
}

// P = M Q: one warp per row of M; the lanes stride along the row (coalesced
// reads of M and of each column of Q) with up to 8 sums each, then shuffles.
__global__ void __launch_bounds__(cta_threads)
    mq_kernel(const float* __restrict__ m, std::size_t size, std::size_t rows, std::size_t cols,
              std::size_t rank, const float* __restrict__ q, float* __restrict__ p) {
  const unsigned lane = threadIdx.x % 32;
  const std::size_t warps = static_cast<std::size_t>(gridDim.x) * (blockDim.x / 32);
  for (std::size_t i = (static_cast<std::size_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
       i < rows; i += warps) {
    const std::size_t row0 = i * cols;
    const std::size_t end = size > row0 ? (size - row0 < cols ? size - row0 : cols) : 0;
    for (std::size_t k0 = 0; k0 < rank; k0 += rank_chunk) {
      const std::size_t kc = rank - k0 < rank_chunk ? rank - k0 : rank_chunk;
      float acc[rank_chunk];
#pragma unroll
      for (int t = 0; t < rank_chunk; ++t) acc[t] = 0.0f;
      for (std::size_t j = lane; j < end; j += 32) {
        const float x = m[row0 + j];
#pragma unroll
        for (int t = 0; t < rank_chunk; ++t) {
          if (static_cast<std::size_t>(t) < kc) acc[t] += x * q[j + (k0 + t) * cols];
        }
      }
#pragma unroll
      for (int t = 0; t < rank_chunk; ++t) {
        const float v = warp_sum(acc[t]);
        if (lane == 0 && static_cast<std::size_t>(t) < kc) p[i + (k0 + t) * rows] = v;
      }
    }
  }
}

// Q = M^T P: a block per tile of 32 columns; its 8 warps take every 8th row,
// each lane one column, so a warp reads 32 consecutive floats of a row; the 8
// partial sums per column are added through shared memory.
constexpr int mtp_rows_per_step = cta_threads / 32;

__global__ void __launch_bounds__(cta_threads)
    mtp_kernel(const float* __restrict__ m, std::size_t size, std::size_t rows, std::size_t cols,
               std::size_t rank, const float* __restrict__ p, float* __restrict__ q) {
  __shared__ float part[mtp_rows_per_step][rank_chunk][33];
  const unsigned tx = threadIdx.x % 32, ty = threadIdx.x / 32;
  const std::size_t tiles = (cols + 31) / 32;
  for (std::size_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const std::size_t j = tile * 32 + tx;
    for (std::size_t k0 = 0; k0 < rank; k0 += rank_chunk) {
      const std::size_t kc = rank - k0 < rank_chunk ? rank - k0 : rank_chunk;
      float acc[rank_chunk];
#pragma unroll
      for (int t = 0; t < rank_chunk; ++t) acc[t] = 0.0f;
      if (j < cols) {
        for (std::size_t i = ty; i < rows; i += mtp_rows_per_step) {
          const std::size_t e = i * cols + j;
          if (e >= size) break;  // the zero padding: every later row is past it too
          const float x = m[e];
#pragma unroll
          for (int t = 0; t < rank_chunk; ++t) {
            if (static_cast<std::size_t>(t) < kc) acc[t] += x * p[i + (k0 + t) * rows];
          }
        }
      }
#pragma unroll
      for (int t = 0; t < rank_chunk; ++t) part[ty][t][tx] = acc[t];
      __syncthreads();
      // Warp ty adds up the sums of rank k0 + ty (8 warps, up to 8 ranks).
      if (ty < kc && j < cols) {
        float v = 0.0f;
#pragma unroll
        for (int w = 0; w < mtp_rows_per_step; ++w) v += part[w][ty][tx];
        q[j + (k0 + ty) * cols] = v;
      }
      __syncthreads();
    }
  }
}

// P = the Q factor of P's Householder QR (the first `rank` columns), as
// Eigen's HouseholderQR followed by householderQ() * Identity(rows, rank):
// for each column k in order, makeHouseholder of a[k.., k] (tau = 0 when the
// tail's squared norm is <= FLT_MIN, else beta = -sign(c0) * norm,
// essential = tail / (c0 - beta), tau = (beta - c0) / beta), applied to the
// columns right of k; then the reflectors applied in reverse order to the
// identity. One block; each reduction is a block sum. a: rows * rank floats
// of scratch, tau: rank floats of scratch.
constexpr int orth_threads = 512;

__global__ void __launch_bounds__(orth_threads)
    orth_kernel(float* __restrict__ p, std::size_t rows, std::size_t rank, float* __restrict__ a,
                float* __restrict__ tau) {
  __shared__ float sh[33];
  const std::size_t tid = threadIdx.x, nt = blockDim.x;
  const std::size_t m = rows;
  for (std::size_t e = tid; e < m * rank; e += nt) a[e] = p[e];
  __syncthreads();
  for (std::size_t k = 0; k < rank; ++k) {
    float* ak = a + k * m;
    const float c0 = ak[k];
    float part = 0.0f;
    for (std::size_t i = k + 1 + tid; i < m; i += nt) part += ak[i] * ak[i];
    const float tail = block_sum(part, sh);
    float tk;
    if (tail <= FLT_MIN) {
      tk = 0.0f;
      for (std::size_t i = k + 1 + tid; i < m; i += nt) ak[i] = 0.0f;
    } else {
      float beta = sqrtf(c0 * c0 + tail);
      if (c0 >= 0.0f) beta = -beta;
      const float d = c0 - beta;
      for (std::size_t i = k + 1 + tid; i < m; i += nt) ak[i] = ak[i] / d;
      tk = (beta - c0) / beta;
    }
    if (tid == 0) tau[k] = tk;
    __syncthreads();
    for (std::size_t j = k + 1; j < rank; ++j) {
      float* aj = a + j * m;
      if (m - k == 1) {
        if (tid == 0) aj[k] *= 1.0f - tk;
      } else if (tk != 0.0f) {
        const float top = aj[k];
        float dot = 0.0f;
        for (std::size_t i = k + 1 + tid; i < m; i += nt) dot += ak[i] * aj[i];
        const float tmp = block_sum(dot, sh) + top;  // barriers: everyone has read aj[k]
        if (tid == 0) aj[k] = top - tk * tmp;
        for (std::size_t i = k + 1 + tid; i < m; i += nt) aj[i] -= (tk * ak[i]) * tmp;
      }
    }
    __syncthreads();
  }
  // The identity's first `rank` columns, then H_{rank-1} first ... H_0 last.
  for (std::size_t e = tid; e < m * rank; e += nt) p[e] = (e % m == e / m) ? 1.0f : 0.0f;
  __syncthreads();
  for (std::size_t kk = rank; kk-- > 0;) {
    const float tk = tau[kk];
    const float* v = a + kk * m;
    // Columns left of kk are still e_j, zero in rows >= kk: H_kk leaves them.
    for (std::size_t j = kk; j < rank; ++j) {
      float* pj = p + j * m;
      if (m - kk == 1) {
        if (tid == 0) pj[kk] *= 1.0f - tk;
      } else if (tk != 0.0f) {
        const float top = pj[kk];
        float dot = 0.0f;
        for (std::size_t i = kk + 1 + tid; i < m; i += nt) dot += v[i] * pj[i];
        const float tmp = block_sum(dot, sh) + top;
        if (tid == 0) pj[kk] = top - tk * tmp;
        for (std::size_t i = kk + 1 + tid; i < m; i += nt) pj[i] -= (tk * v[i]) * tmp;
      }
    }
    __syncthreads();
  }
}

// out = P Q_sum^T (divided by divide_by > 1) and, with a residual, r = c - P
// Q_mine^T, c being m's element before it is overwritten: one pass.
__global__ void __launch_bounds__(cta_threads)
    decode_kernel(float* __restrict__ m, float* __restrict__ r, std::size_t size, std::size_t rows,
                  std::size_t cols, std::size_t rank, const float* __restrict__ p,
                  const float* __restrict__ q_mine, const float* __restrict__ q_sum,
                  int divide_by) {
  const std::size_t stride = static_cast<std::size_t>(gridDim.x) * blockDim.x;
  for (std::size_t e = static_cast<std::size_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < size;
       e += stride) {
    const std::size_t i = e / cols, j = e - i * cols;
    float t = 0.0f, mine = 0.0f;
    for (std::size_t k = 0; k < rank; ++k) {
      const float pk = p[i + k * rows];
      t += pk * q_sum[j + k * cols];
      if (r) mine += pk * q_mine[j + k * cols];
    }
    if (r) r[e] = kn::ef_residual{}(m[e], mine);
    m[e] = divide_by > 1 ? t / static_cast<float>(divide_by) : t;
  }
}

__global__ void __launch_bounds__(cta_threads)
    fold_kernel(float* __restrict__ g, const float* __restrict__ r, std::size_t n) {
  const std::size_t stride = static_cast<std::size_t>(gridDim.x) * blockDim.x;
  for (std::size_t i = static_cast<std::size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    g[i] = kn::ef_compensate{}(g[i], r[i]);
  }
}

__global__ void __launch_bounds__(cta_threads)
    raw_kernel(float* __restrict__ data, float* __restrict__ r, std::size_t n,
               const float* __restrict__ summed, int divide_by) {
  const std::size_t stride = static_cast<std::size_t>(gridDim.x) * blockDim.x;
  for (std::size_t i = static_cast<std::size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    // Sent as it is: mine = c, so r = c - c (0, or NaN where c is not finite).
    if (r) r[i] = kn::ef_residual{}(data[i], data[i]);
    const float t = summed[i];
    data[i] = divide_by > 1 ? t / static_cast<float>(divide_by) : t;
  }
}

void check_matrix(const char* what, std::size_t size, std::size_t rows, std::size_t cols,
                  std::size_t rank) {
  require(rows > 0 && cols > 0 && size <= rows * cols && rank >= 1 && rank <= rows && rank <= cols,
          what, "need rows, cols >= 1, size <= rows * cols and 1 <= rank <= min(rows, cols)");
}

}  // namespace

void powersgd_init_q(float* q, std::size_t count, std::uint64_t key, cudaStream_t s) {
  if (count == 0) return;
  init_q_kernel<<<ctas_for_items(count), cta_threads, 0, s>>>(q, count, key);
  RINGFLOW_CHECK_LAUNCH("powersgd_init_q");
}

void powersgd_mq(const float* m, std::size_t size, std::size_t rows, std::size_t cols,
                 std::size_t rank, const float* q, float* p, cudaStream_t s) {
  check_matrix("powersgd_mq", size, rows, cols, rank);
  const unsigned ctas = std::min<unsigned>(ctas_for_warps(rows), 8192);
  mq_kernel<<<ctas, cta_threads, 0, s>>>(m, size, rows, cols, rank, q, p);
  RINGFLOW_CHECK_LAUNCH("powersgd_mq");
}

void powersgd_mtp(const float* m, std::size_t size, std::size_t rows, std::size_t cols,
                  std::size_t rank, const float* p, float* q, cudaStream_t s) {
  check_matrix("powersgd_mtp", size, rows, cols, rank);
  const unsigned ctas = static_cast<unsigned>(std::min<std::size_t>((cols + 31) / 32, 8192));
  mtp_kernel<<<ctas, cta_threads, 0, s>>>(m, size, rows, cols, rank, p, q);
  RINGFLOW_CHECK_LAUNCH("powersgd_mtp");
}

std::size_t powersgd_orthonormalize_scratch_floats(std::size_t rows, std::size_t rank) {
  return rows * rank + rank;
}

void powersgd_orthonormalize(float* p, std::size_t rows, std::size_t rank, float* scratch,
                             cudaStream_t s) {
  require(rank >= 1 && rank <= rows, "powersgd_orthonormalize", "need 1 <= rank <= rows");
  orth_kernel<<<1, orth_threads, 0, s>>>(p, rows, rank, scratch, scratch + rows * rank);
  RINGFLOW_CHECK_LAUNCH("powersgd_orthonormalize");
}

void powersgd_decode_ef(float* m, float* residual, std::size_t size, std::size_t rows,
                        std::size_t cols, std::size_t rank, const float* p, const float* q_mine,
                        const float* q_sum, int divide_by, cudaStream_t s) {
  check_matrix("powersgd_decode_ef", size, rows, cols, rank);
  if (size == 0) return;
  decode_kernel<<<ctas_for_items(size), cta_threads, 0, s>>>(m, residual, size, rows, cols, rank, p,
                                                             q_mine, q_sum, divide_by);
  RINGFLOW_CHECK_LAUNCH("powersgd_decode_ef");
}

void powersgd_fold(float* grad, const float* residual, std::size_t n, cudaStream_t s) {
  if (n == 0 || residual == nullptr) return;
  fold_kernel<<<ctas_for_items(n), cta_threads, 0, s>>>(grad, residual, n);
  RINGFLOW_CHECK_LAUNCH("powersgd_fold");
}

void powersgd_raw_ef(float* data, float* residual, std::size_t n, const float* summed,
                     int divide_by, cudaStream_t s) {
  if (n == 0) return;
  raw_kernel<<<ctas_for_items(n), cta_threads, 0, s>>>(data, residual, n, summed, divide_by);
  RINGFLOW_CHECK_LAUNCH("powersgd_raw_ef");
}

}  // namespace ringflow::cuda
