// libringflow_gpu_bench.so: the C entry points of gpu_bench_api.h. Host code
// only: each function forwards to a launcher of ringflow/cuda/compress.hpp
// and turns an exception into a return code plus rf_last_error(), because an
// exception must not cross into a ctypes caller (it would abort Python).
#include "gpu_bench_api.h"

#include <cuda_runtime_api.h>

#include <cstdint>
#include <exception>
#include <string>

#include "ringflow/compress/kernels.hpp"
#include "ringflow/core/error.hpp"
#include "ringflow/cuda/check.hpp"
#include "ringflow/cuda/compress.hpp"

namespace {

namespace rc = ringflow::cuda;
namespace kn = ringflow::compress::kernels;

thread_local std::string g_last_error;

// Runs `body`; 0 on success, the CUDA error code or -1 with the message kept.
template <class F>
int guarded(const char* what, F&& body) noexcept {
  try {
    g_last_error.clear();
    body();
    return 0;
  } catch (const rc::cuda_error& e) {
    g_last_error = e.what();
    return static_cast<int>(e.code());
  } catch (const std::exception& e) {
    g_last_error = std::string(what) + ": " + e.what();
    return -1;
  } catch (...) {
    g_last_error = std::string(what) + ": unknown exception";
    return -1;
  }
}

cudaStream_t as_stream(void* s) { return static_cast<cudaStream_t>(s); }

void require(bool ok, const char* what) {
  if (!ok) throw ringflow::usage_error(what);
}

}  // namespace

extern "C" {

const char* rf_last_error(void) { return g_last_error.c_str(); }

int rf_device_count(void) {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error
    return 0;
  }
  return n;
}

uint64_t rf_stream_key(uint64_t seed, uint64_t step, uint64_t rank) {
  return kn::stream_key(seed, step, rank);
}

int rf_stream_synchronize(void* stream) {
  return guarded("rf_stream_synchronize",
                 [&] { RINGFLOW_CHECK_CUDA(cudaStreamSynchronize(as_stream(stream))); });
}

int rf_sign_ef_encode(const void* grad, void* residual, size_t n, size_t block, void* scales,
                      void* words, void* stream) {
  return guarded("rf_sign_ef_encode", [&] {
    require(block > 0 && block % 32 == 0, "block must be a positive multiple of 32");
    rc::sign_ef_encode(static_cast<const float*>(grad), static_cast<float*>(residual), n, block,
                       static_cast<float*>(scales), static_cast<std::uint32_t*>(words),
                       as_stream(stream));
  });
}

int rf_sign_decode_add(const void* scales, const void* words, size_t n, size_t block, void* out,
                       void* stream) {
  return guarded("rf_sign_decode_add", [&] {
    require(block > 0 && block % 32 == 0, "block must be a positive multiple of 32");
    rc::sign_decode_add(static_cast<const float*>(scales), static_cast<const std::uint32_t*>(words),
                        n, block, static_cast<float*>(out), as_stream(stream));
  });
}

int rf_int8_ef_encode(const void* grad, void* residual, size_t n, size_t block, uint64_t seed,
                      uint64_t step, void* scales, void* q, void* stream) {
  return guarded("rf_int8_ef_encode", [&] {
    require(block > 0, "block must be positive");
    rc::int8_ef_encode(static_cast<const float*>(grad), static_cast<float*>(residual), n, block,
                       kn::stream_key(seed, step, 0), static_cast<float*>(scales),
                       static_cast<std::int8_t*>(q), as_stream(stream));
  });
}

int rf_int8_decode_add(const void* q, const void* scales, size_t n, size_t block, int levels,
                       void* out, void* stream) {
  return guarded("rf_int8_decode_add", [&] {
    require(block > 0, "block must be positive");
    require(levels >= 1 && levels <= 127, "levels must be in [1, 127]");
    rc::int8_decode_add(static_cast<const std::int8_t*>(q), static_cast<const float*>(scales), n,
                        block, levels, static_cast<float*>(out), as_stream(stream));
  });
}

size_t rf_topk_workspace_bytes(size_t n, size_t k) {
  try {
    g_last_error.clear();
    return rc::topk_workspace_bytes(n, k);
  } catch (const std::exception& e) {
    g_last_error = std::string("rf_topk_workspace_bytes: ") + e.what();
    return 0;
  }
}

int rf_topk_ef_encode(const void* grad, void* residual, size_t n, size_t k, uint64_t seed,
                      uint64_t step, void* indices, void* values, void* workspace,
                      size_t workspace_bytes, void* stream) {
  return guarded("rf_topk_ef_encode", [&] {
    require(k >= 1 && k <= n, "k must be in [1, n]");
    require(workspace_bytes >= rc::topk_workspace_bytes(n, k),
            "workspace smaller than rf_topk_workspace_bytes(n, k)");
    rc::topk_ef_encode(static_cast<const float*>(grad), static_cast<float*>(residual), n, k,
                       kn::stream_key(seed, step, kn::topk_sample_stream),
                       static_cast<std::uint32_t*>(indices), static_cast<float*>(values), workspace,
                       workspace_bytes, as_stream(stream));
  });
}

int rf_topk_decode_add(const void* indices, const void* values, size_t k, size_t n, void* out,
                       void* stream) {
  return guarded("rf_topk_decode_add", [&] {
    rc::topk_decode_add(static_cast<const std::uint32_t*>(indices),
                        static_cast<const float*>(values), k, n, static_cast<float*>(out),
                        as_stream(stream));
  });
}

int rf_half_ef_encode(int bf16, const void* grad, void* residual, size_t n, void* out,
                      void* stream) {
  return guarded("rf_half_ef_encode", [&] {
    rc::half_ef_encode(bf16 != 0 ? rc::half_format::bf16 : rc::half_format::fp16,
                       static_cast<const float*>(grad), static_cast<float*>(residual), n,
                       static_cast<std::uint16_t*>(out), as_stream(stream));
  });
}

int rf_half_decode_add(int bf16, const void* in, size_t n, void* out, void* stream) {
  return guarded("rf_half_decode_add", [&] {
    rc::half_decode_add(bf16 != 0 ? rc::half_format::bf16 : rc::half_format::fp16,
                        static_cast<const std::uint16_t*>(in), n, static_cast<float*>(out),
                        as_stream(stream));
  });
}

}  // extern "C"
