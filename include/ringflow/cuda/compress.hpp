// Fused CUDA compression kernels: host-callable launchers on raw device
// pointers, the GPU twins of the CPU compressors of compress/compressor.hpp.
//
// Every launcher queues its kernel(s) on `s` and returns at once: no host
// synchronization, no device-to-host copy, no allocation (top-k takes a
// caller-provided workspace). Launches are checked (RINGFLOW_CHECK_LAUNCH);
// a fault inside a kernel surfaces at the caller's next synchronizing call.
// All pointers are device pointers; n == 0 launches nothing.
//
// Bit-exactness contract: with the same inputs, the payloads, residuals and
// decoded values are bit for bit those of the CPU reference (sign_compressor,
// int8_compressor, topk_compressor, half_compressor and the error feedback of
// compressed_allreduce), because the per-element math is the RINGFLOW_HOST_DEVICE
// functors of compress/kernels.hpp, the sign scale is summed in the canonical
// order defined there (kernels::abs_sum_block), the stochastic rounding draws
// kernels::uniform01(key, index) on both sides, and no multiply is fused into
// an add (kernels::mul_rn).
//
// Error feedback: every *_ef_* encoder takes the gradient g and the residual r
// of the same n elements and, in the same pass, compresses c = g + r and
// overwrites r with c - t, where t is what the payload decodes to (exactly
// compressed_allreduce's r = c - mine). `residual` may be null: then c = g and
// nothing but the payload is written (no error feedback).
//
// Payload layouts are the CPU ones, so a payload can be copied to the host and
// fed to the CPU compressor's decode_add (and back):
//   sign:  [ceil(n/block) fp32 scales][ceil(n/32) uint32 words]
//   int8:  [ceil(n/block) fp32 scales][n int8]
//   top-k: [k uint32 indices][k fp32 values]
//   fp16/bf16: [n uint16]
// The launchers take the parts as separate pointers; for one contiguous
// payload buffer p pass p and p + 4 * ceil(n/block) (sign, int8), or
// p and p + 4 * k (top-k). Every part must be 4-byte aligned (int8 values and
// 16-bit values: 1 and 2 bytes); g and r must be 4-byte aligned, and the
// kernels use 16-byte vector access where the pointers allow it.
//
// Needs the CUDA toolkit headers: include only where RINGFLOW_HAS_CUDA is 1.
//
// Signature changes after the first commit (07:10 UTC): none (added:
// none_ef_encode, the powersgd_* pieces).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace ringflow::cuda {

// ---------------------------------------------------------------------------
// Sizes

/// Number of block scales of n elements: ceil(n / block).
constexpr std::size_t block_count(std::size_t n, std::size_t block) {
  return (n + block - 1) / block;
}
/// Number of 32-bit sign words of n elements: ceil(n / 32).
constexpr std::size_t sign_word_count(std::size_t n) { return (n + 31) / 32; }
/// Bytes of one sign payload (= sign_compressor::payload_bytes).
constexpr std::size_t sign_payload_bytes(std::size_t n, std::size_t block) {
  return 4 * block_count(n, block) + 4 * sign_word_count(n);
}
/// Bytes of one int8 payload (= int8_compressor::payload_bytes).
constexpr std::size_t int8_payload_bytes(std::size_t n, std::size_t block) {
  return 4 * block_count(n, block) + n;
}
/// Bytes of one top-k payload (= topk_compressor::payload_bytes for this k).
constexpr std::size_t topk_payload_bytes(std::size_t k) { return 8 * k; }

// ---------------------------------------------------------------------------
// 1-bit scaled sign with error feedback (sign_compressor)

/// One pass: reads g and r once; writes r, one fp32 scale per block (the mean
/// |c| of the block, summed in the canonical order of kernels::abs_sum_block)
/// and the packed signs (bit i of word w = element 32w + i is negative; the
/// unused high bits of the last word are 0). block: a positive multiple of 32
/// (fastest up to 1024; larger blocks read g and r twice).
/// Bytes per element: 12 + 4/block + 1/8 (~12.14 at block 256).
///   grad:     n floats, read
///   residual: n floats, read and written (or null)
///   scales:   block_count(n, block) floats, written
///   words:    sign_word_count(n) uint32, written
void sign_ef_encode(const float* grad, float* residual, std::size_t n, std::size_t block,
                    float* scales, std::uint32_t* words, cudaStream_t s);

/// out[i] += (bit i set ? -scale : +scale) of i's block (sign_compressor::decode_add).
/// Bytes per element: 8 + 1/8 + 4/block.
void sign_decode_add(const float* scales, const std::uint32_t* words, std::size_t n,
                     std::size_t block, float* out, cudaStream_t s);

/// The decode side of the sign allgather, fused into one pass over out:
/// out[i] = (((0 + d_0[i]) + d_1[i]) + ... + d_{count-1}[i]) / divide_by, where
/// d_r decodes payload r = the sign_payload_bytes(n, block) bytes at
/// payloads + r * payload_stride (stride a multiple of 4). Exactly the CPU's
/// gather_compressor::reduce followed by compressed_allreduce's averaging;
/// divide_by <= 1 divides by nothing. out is only written (4 bytes per element
/// plus count * (1/8 + 4/block)).
void sign_decode_sum(const void* payloads, std::size_t payload_stride, int count, std::size_t n,
                     std::size_t block, float* out, int divide_by, cudaStream_t s);

// ---------------------------------------------------------------------------
// int8, block-wise, stochastic rounding, error feedback (int8_compressor)
//
// Random numbers: element i (its index in the bucket) draws
// kernels::uniform01(key, i). To match the CPU compressor pass
// key = kernels::stream_key(seed, step, 0) for its encode() and
// kernels::stream_key(seed, step, rank) for its reduce(), step being the
// number of earlier calls on that compressor object.

/// (a) One pass with local scales (= int8_compressor::encode with error
/// feedback): scale = max |c| of the block, levels 127. Reads g and r once;
/// writes r, the scales and q. Any block >= 1 (one pass up to 1024; larger
/// blocks read g and r twice).
/// Bytes per element: 13 + 4/block.
///   grad:     n floats, read
///   residual: n floats, read and written (or null)
///   scales:   block_count(n, block) floats, written
///   q:        n int8, written
void int8_ef_encode(const float* grad, float* residual, std::size_t n, std::size_t block,
                    std::uint64_t key, float* scales, std::int8_t* q, cudaStream_t s);

/// (b1) Shared-scale path, step 1: scales[b] = max |g + r| over block b
/// (NaN if the block holds one). Reads g and r; writes the scales
/// (8 bytes per element). The caller then max-allreduces the scales
/// (ncclMax on ncclFloat32).
void int8_block_absmax(const float* grad, const float* residual, std::size_t n, std::size_t block,
                       float* scales, cudaStream_t s);

/// (b2) Shared-scale path, step 2: quantizes c = g + r with the given
/// (max-allreduced) scales to [-levels, levels] (levels = 127 / nranks, so
/// the int8 sum of nranks payloads cannot overflow) and sets r = c - q * step.
/// Reads g, r and the scales; writes r and q (13 bytes per element).
void int8_ef_quantize(const float* grad, float* residual, std::size_t n, std::size_t block,
                      const float* scales, int levels, std::uint64_t key, std::int8_t* q,
                      cudaStream_t s);

/// out[i] += q[i] * (scales[b] / levels) (int8_compressor::decode_add with
/// levels 127; any levels for the shared-scale path). 9 bytes per element.
void int8_decode_add(const std::int8_t* q, const float* scales, std::size_t n, std::size_t block,
                     int levels, float* out, cudaStream_t s);

/// out[i] = (q[i] * (scales[b] / levels)) / divide_by (overwrite): the decode
/// of the summed int8 payload, with compressed_allreduce's averaging fused in
/// (divide_by <= 1: no division). 5 bytes per element.
void int8_decode(const std::int8_t* q, const float* scales, std::size_t n, std::size_t block,
                 int levels, float* out, int divide_by, cudaStream_t s);

// ---------------------------------------------------------------------------
// top-k by magnitude with error feedback (topk_compressor)

/// Workspace bytes topk_ef_encode needs for n elements and k kept.
std::size_t topk_workspace_bytes(std::size_t n, std::size_t k);

/// Keeps the k elements of c = g + r with the largest |c| (ties: the lower
/// index; NaN counts above Inf, as kernels::magnitude_key orders them), writes
/// their indices in increasing order and their values c[i], and sets r = c
/// everywhere except at the kept indices, where r = c - c. Exactly
/// topk_compressor::encode's selection, whose set is unique for that order.
/// n <= exact_limit or 4k >= n: exact selection over all elements; larger n:
/// a threshold from 8192 samples drawn with `key` (pass
/// kernels::stream_key(seed, step, kernels::topk_sample_stream) to use the
/// CPU's samples), then an
/// exact selection among the elements above it (over all elements if fewer
/// than k passed). Always writes exactly k pairs.
/// 1 <= k <= n < 2^32. Bytes per element: about 12 (g and r read once, r
/// written once) plus n/4 bytes of bitmaps and about 16 bytes per candidate.
///   indices, values: k each, written
///   workspace:       topk_workspace_bytes(n, k) bytes, scratch (any content
///                    on entry; must not be used by other work queued
///                    concurrently on another stream)
void topk_ef_encode(const float* grad, float* residual, std::size_t n, std::size_t k,
                    std::uint64_t key, std::uint32_t* indices, float* values, void* workspace,
                    std::size_t workspace_bytes, cudaStream_t s,
                    std::size_t exact_limit = std::size_t{1} << 16);

/// out[indices[j]] += values[j] for j < k (topk_compressor::decode_add). The
/// indices of one payload are distinct, so no atomics and no order issue;
/// several payloads must be added one call after the other (in rank order,
/// as the CPU does). Indices >= n are skipped (the CPU throws on them).
void topk_decode_add(const std::uint32_t* indices, const float* values, std::size_t k,
                     std::size_t n, float* out, cudaStream_t s);

// ---------------------------------------------------------------------------
// fp16 / bf16 with error feedback (half_compressor)

enum class half_format { fp16, bf16 };

/// One pass: out[i] = round-to-nearest-even(c), r = c - decode(out[i]).
/// 14 bytes per element (10 without a residual).
void half_ef_encode(half_format f, const float* grad, float* residual, std::size_t n,
                    std::uint16_t* out, cudaStream_t s);

/// out[i] += decode(in[i]). 10 bytes per element.
void half_decode_add(half_format f, const std::uint16_t* in, std::size_t n, float* out,
                     cudaStream_t s);

/// out[i] = decode(in[i]) / divide_by (overwrite; divide_by <= 1: none): the
/// last step of the fp16/bf16 allreduce, a plain decode like
/// half_compressor::reduce's (a -0 payload gives -0, where compressor::decode,
/// zero fill then decode_add, gives +0). 6 bytes per element.
void half_decode(half_format f, const std::uint16_t* in, std::size_t n, float* out, int divide_by,
                 cudaStream_t s);

// ---------------------------------------------------------------------------
// No compression, with error feedback (none_compressor)

/// grad = c = g + r and r = c - c (what compressed_allreduce does for "none":
/// everything is transmitted, the residual keeps only the rounding of c - c,
/// i.e. zeros, or NaN where c is not finite). 12 bytes per element.
void none_ef_encode(float* grad, float* residual, std::size_t n, cudaStream_t s);

// ---------------------------------------------------------------------------
// PowerSGD (powersgd_compressor): the pieces of its two-allreduce step, one
// matrix at a time (compressed_allreduce queues them for a bucket's plan).
//
// A matrix M is the row-major rows x cols view of `size` floats at m (size <
// rows * cols only for the zero-padded matrix of a bucket without a layout:
// the elements past `size` read as 0). P (rows x rank) and Q (cols x rank)
// are column-major, as in the CPU payload. 1 <= rank <= min(rows, cols).
// The float sums run in another order than Eigen's: the results equal the
// CPU's to rounding, not bit for bit.

/// q[i] = kernels::uniform01(key, i) - 0.5 for i < count: the CPU's warm-start
/// initialization of one matrix (key = stream_key(seed, bucket_id, 0x9a5d)).
void powersgd_init_q(float* q, std::size_t count, std::uint64_t key, cudaStream_t s);

/// P = M Q: one warp per row of M, up to 8 ranks per pass over the row (a
/// larger rank reads M again per further 8). Reads M once (rank <= 8).
void powersgd_mq(const float* m, std::size_t size, std::size_t rows, std::size_t cols,
                 std::size_t rank, const float* q, float* p, cudaStream_t s);

/// Q = M^T P: one CTA per tile of 32 columns, its warps reading rows of the
/// tile coalesced and adding their partial sums in shared memory. Reads M
/// once (rank <= 8). A matrix with few column tiles runs on few CTAs.
void powersgd_mtp(const float* m, std::size_t size, std::size_t rows, std::size_t cols,
                  std::size_t rank, const float* p, float* q, cudaStream_t s);

/// Scratch floats powersgd_orthonormalize needs.
std::size_t powersgd_orthonormalize_scratch_floats(std::size_t rows, std::size_t rank);

/// P = an orthonormal basis of P's columns, exactly the method of the CPU
/// compressor (Eigen's HouseholderQR, then householderQ() times the first
/// `rank` columns of the identity): same column order, same reflector signs
/// (so the same basis vectors, not just the same span), a zero or
/// rank-deficient column handled as Eigen does (no reflection). One CTA;
/// rank^2 block reductions over the rows. scratch: the floats named above.
void powersgd_orthonormalize(float* p, std::size_t rows, std::size_t rank, float* scratch,
                             cudaStream_t s);

/// The fused decode with error feedback, one pass over the matrix: with a
/// residual, residual[e] = c[e] - (P Q_mine^T)[e], c being m's content on
/// entry; then m[e] = (P Q_sum^T)[e] / divide_by (divide_by <= 1: none).
/// residual may be null (q_mine is then unused). 12 bytes per element.
void powersgd_decode_ef(float* m, float* residual, std::size_t size, std::size_t rows,
                        std::size_t cols, std::size_t rank, const float* p, const float* q_mine,
                        const float* q_sum, int divide_by, cudaStream_t s);

/// grad = grad + residual (c, error feedback's compensation); residual null:
/// nothing. residual itself is left for powersgd_decode_ef / powersgd_raw_ef.
void powersgd_fold(float* grad, const float* residual, std::size_t n, cudaStream_t s);

/// Elements sent uncompressed: with a residual, residual = c - c (c = data on
/// entry); then data = summed / divide_by (divide_by <= 1: none).
void powersgd_raw_ef(float* data, float* residual, std::size_t n, const float* summed,
                     int divide_by, cudaStream_t s);

}  // namespace ringflow::cuda
