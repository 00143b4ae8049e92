// Checked CUDA calls. Every CUDA runtime call in ringflow goes through
// RINGFLOW_CHECK_CUDA, so a failure throws ringflow::cuda::cuda_error naming
// the call, the rank, the CUDA error and the source line, instead of being
// ignored until some later call fails for an unrelated-looking reason.
//
// Needs the CUDA toolkit headers: include only where RINGFLOW_HAS_CUDA is 1
// (ringflow::cuda built with nvcc). NCCL's twin, RINGFLOW_CHECK_NCCL, lives in
// ringflow/cuda/nccl.hpp.
#pragma once

#include <cuda_runtime_api.h>

#include <string>

#include "ringflow/core/error.hpp"

namespace ringflow::cuda {

/// A failed CUDA runtime call or kernel launch (out of memory, illegal
/// address, no device...). The message names the call, rank and CUDA error.
class cuda_error : public ringflow::error {
 public:
  cuda_error(const std::string& what, cudaError_t code) : ringflow::error(what), code_(code) {}
  cudaError_t code() const noexcept { return code_; }

 private:
  cudaError_t code_;
};

/// The rank error messages name. set_error_rank() sets it (the NCCL and staged
/// communicators do); otherwise it is read once from the launcher's
/// environment (OMPI_COMM_WORLD_RANK, PMIX_RANK, PMI_RANK), or -1 if none.
int error_rank() noexcept;
void set_error_rank(int rank) noexcept;

namespace detail {
/// "rank 3: cudaMemcpyAsync(...) failed: <text> (cudaErrorX) [file:line]".
std::string describe_failure(const char* api_error, const char* api_text, const char* call,
                             const char* file, int line);
[[noreturn]] void throw_cuda_error(cudaError_t code, const char* call, const char* file, int line);
/// For destructors: logs the failure instead of throwing.
void log_cuda_error(cudaError_t code, const char* call, const char* file, int line) noexcept;
}  // namespace detail

}  // namespace ringflow::cuda

/// Throws ringflow::cuda::cuda_error if `call` does not return cudaSuccess.
#define RINGFLOW_CHECK_CUDA(call)                                                             \
  do {                                                                                        \
    const cudaError_t rf_cuda_status_ = (call);                                               \
    if (rf_cuda_status_ != cudaSuccess)                                                       \
      ::ringflow::cuda::detail::throw_cuda_error(rf_cuda_status_, #call, __FILE__, __LINE__); \
  } while (0)

/// After a kernel launch: throws if the launch itself failed (bad grid,
/// missing kernel image). `what` is a string literal naming the kernel.
/// Faults inside the kernel surface at the next synchronizing call.
#define RINGFLOW_CHECK_LAUNCH(what)                                                            \
  do {                                                                                         \
    const cudaError_t rf_cuda_status_ = cudaGetLastError();                                    \
    if (rf_cuda_status_ != cudaSuccess)                                                        \
      ::ringflow::cuda::detail::throw_cuda_error(rf_cuda_status_, "launch of " what, __FILE__, \
                                                 __LINE__);                                    \
  } while (0)

/// In destructors and other noexcept paths: logs a failure, never throws.
#define RINGFLOW_LOG_CUDA(call)                                                             \
  do {                                                                                      \
    const cudaError_t rf_cuda_status_ = (call);                                             \
    if (rf_cuda_status_ != cudaSuccess)                                                     \
      ::ringflow::cuda::detail::log_cuda_error(rf_cuda_status_, #call, __FILE__, __LINE__); \
  } while (0)
