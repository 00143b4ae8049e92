/* C entry points to ringflow's fused CUDA compression kernels
 * (ringflow/cuda/compress.hpp), for Python ctypes: libringflow_gpu_bench.so.
 *
 * Plain C types only: device pointers as void*, sizes as size_t, a
 * cudaStream_t as void* (torch.cuda.current_stream().cuda_stream; NULL is the
 * legacy default stream). The arguments follow the C++ launchers one for one,
 * in the same order, except that the random stream key is built here from
 * (seed, step) exactly as the CPU compressors build it.
 *
 * Every call queues work on the stream and returns at once (no host
 * synchronization). It returns 0, or a cudaError_t value (> 0) when CUDA
 * reported an error (a bad launch, or a fault of earlier work that surfaced),
 * or -1 for any other failure (a usage error: a bad size or block); then
 * rf_last_error() describes it (this thread's last failure; "" after none).
 */
#ifndef RINGFLOW_BENCH_GPU_BENCH_API_H
#define RINGFLOW_BENCH_GPU_BENCH_API_H

#include <stddef.h>
#include <stdint.h>

/* The rf_* functions are the library's only exports (built with hidden
 * visibility, so nothing of the statically linked ringflow leaks out). */
#if defined(__GNUC__)
#define RF_API __attribute__((visibility("default")))
#else
#define RF_API
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* This thread's last failure message; valid until its next rf_* call. */
RF_API const char* rf_last_error(void);

/* Number of visible GPUs (0 without a driver or device). */
RF_API int rf_device_count(void);

/* The counter-based random stream key the compressors use
 * (kernels::stream_key(seed, step, rank)). */
RF_API uint64_t rf_stream_key(uint64_t seed, uint64_t step, uint64_t rank);

/* cudaStreamSynchronize(stream): surfaces faults of queued kernels. */
RF_API int rf_stream_synchronize(void* stream);

/* 1-bit sign with error feedback: scales ceil(n/block) floats, words
 * ceil(n/32) uint32. residual may be NULL (no error feedback). */
RF_API int rf_sign_ef_encode(const void* grad, void* residual, size_t n, size_t block, void* scales,
                             void* words, void* stream);
/* out[i] += +-scale of element i. */
RF_API int rf_sign_decode_add(const void* scales, const void* words, size_t n, size_t block,
                              void* out, void* stream);

/* int8 block-wise, local scales (max |c|), levels 127, stochastic rounding with
 * the key stream_key(seed, step, 0), error feedback. q: n int8. */
RF_API int rf_int8_ef_encode(const void* grad, void* residual, size_t n, size_t block,
                             uint64_t seed, uint64_t step, void* scales, void* q, void* stream);
/* out[i] += q[i] * (scale / levels). */
RF_API int rf_int8_decode_add(const void* q, const void* scales, size_t n, size_t block, int levels,
                              void* out, void* stream);

/* top-k by magnitude with error feedback; the sampling key is
 * stream_key(seed, step, topk_sample_stream) as in the CPU compressor. indices: k uint32
 * (increasing), values: k floats; workspace: rf_topk_workspace_bytes(n, k). */
RF_API size_t rf_topk_workspace_bytes(size_t n, size_t k);
RF_API int rf_topk_ef_encode(const void* grad, void* residual, size_t n, size_t k, uint64_t seed,
                             uint64_t step, void* indices, void* values, void* workspace,
                             size_t workspace_bytes, void* stream);
/* out[indices[j]] += values[j]. */
RF_API int rf_topk_decode_add(const void* indices, const void* values, size_t k, size_t n,
                              void* out, void* stream);

/* fp16 (bf16 = 0) or bf16 (bf16 = 1) with error feedback: out n uint16. */
RF_API int rf_half_ef_encode(int bf16, const void* grad, void* residual, size_t n, void* out,
                             void* stream);
/* out[i] += decode(in[i]). */
RF_API int rf_half_decode_add(int bf16, const void* in, size_t n, void* out, void* stream);

#ifdef __cplusplus
}
#endif

#endif /* RINGFLOW_BENCH_GPU_BENCH_API_H */
