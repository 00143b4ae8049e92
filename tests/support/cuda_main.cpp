// Test entry point for GPU tests: exits with 77 (ctest "skipped") without a GPU.
#if __has_include(<catch2/catch_session.hpp>)
#include <catch2/catch_session.hpp>
#else
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>
#endif

#include <cstdio>

#include "ringflow/cuda/device.hpp"

int main(int argc, char** argv) {
  if (!ringflow::cuda::available()) {
    std::printf("no GPU visible (compiled_with_cuda=%d): cuda tests skipped\n",
                ringflow::cuda::compiled_with_cuda() ? 1 : 0);
    return 77;
  }
  return Catch::Session().run(argc, argv);
}
