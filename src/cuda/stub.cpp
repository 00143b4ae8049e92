// ringflow::cuda for builds without nvcc: reports no GPU, refuses GPU calls.
#include <string>

#include "ringflow/core/error.hpp"
#include "ringflow/cuda/device.hpp"

namespace ringflow::cuda {

bool available() noexcept { return false; }
int device_count() noexcept { return 0; }
bool compiled_with_cuda() noexcept { return false; }
std::string device_name(int) {
  throw not_supported_error(
      "ringflow was built without CUDA (RINGFLOW_WITH_CUDA=OFF or no nvcc found); "
      "rebuild with the CUDA toolkit to use GPUs");
}

}  // namespace ringflow::cuda
