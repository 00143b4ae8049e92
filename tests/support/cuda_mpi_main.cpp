// Test entry point for GPU tests run under mpirun: like mpi_main.cpp, but every
// rank exits 77 (ctest "skipped") when no GPU is visible, so CI without a GPU
// reports these tests as skipped rather than passed. Ranks share GPU 0 when
// there is only one (what the staged MPI path is for).
#if __has_include(<catch2/catch_session.hpp>)
#include <catch2/catch_session.hpp>
#else
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>
#endif

#include <cstdio>
#include <cstdlib>

#include "ringflow/backends/mpi.hpp"
#include "ringflow/coll/collectives.hpp"
#include "ringflow/cuda/device.hpp"

int main(int argc, char** argv) {
  setenv("RINGFLOW_CHECK", "full",
         /*overwrite=*/0);  // the mismatch tests expect every rank to name every call
  ringflow::mpi::environment env(argc, argv);
  auto world = ringflow::mpi::world();
  // Every rank decides the same way (a rank without a GPU would otherwise
  // wait forever for peers that run the tests).
  int have_gpu = ringflow::cuda::available() ? 1 : 0;
  ringflow::allreduce(world, std::span<int>(&have_gpu, 1), ringflow::min);
  if (have_gpu == 0) {
    if (world.rank() == 0) {
      std::printf("no GPU visible on some rank (compiled_with_cuda=%d): cuda tests skipped\n",
                  ringflow::cuda::compiled_with_cuda() ? 1 : 0);
    }
    return 77;
  }
  Catch::Session session;
  if (world.rank() != 0) session.configData().showSuccessfulTests = false;
  const int failed = session.run(argc, argv);
  int any_failed = failed != 0 ? 1 : 0;
  ringflow::allreduce(world, std::span<int>(&any_failed, 1), ringflow::max);
  return any_failed ? 1 : 0;
}
