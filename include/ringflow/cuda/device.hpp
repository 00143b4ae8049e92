// GPU discovery. Always available: in a build without CUDA, available() is
// false and the other calls throw not_supported_error.
#pragma once

#include <string>

namespace ringflow::cuda {

/// True when this build has CUDA and at least one GPU is visible.
bool available() noexcept;
/// Number of visible GPUs (0 without CUDA or without a driver).
int device_count() noexcept;
/// The GPU's marketing name, for example "NVIDIA H100 80GB HBM3".
std::string device_name(int device);
/// True when ringflow::cuda was compiled with nvcc.
bool compiled_with_cuda() noexcept;

}  // namespace ringflow::cuda
