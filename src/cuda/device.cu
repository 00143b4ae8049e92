// GPU discovery through the CUDA runtime.
#include <cuda_runtime.h>

#include <string>

#include "ringflow/core/error.hpp"
#include "ringflow/cuda/device.hpp"

namespace ringflow::cuda {

int device_count() noexcept {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error
    return 0;
  }
  return n;
}

bool available() noexcept { return device_count() > 0; }
bool compiled_with_cuda() noexcept { return true; }

std::string device_name(int device) {
  cudaDeviceProp prop{};
  const cudaError_t rc = cudaGetDeviceProperties(&prop, device);
  if (rc != cudaSuccess) {
    throw not_supported_error(std::string("cudaGetDeviceProperties(") + std::to_string(device) +
                              ") failed: " + cudaGetErrorString(rc));
  }
  return prop.name;
}

}  // namespace ringflow::cuda
