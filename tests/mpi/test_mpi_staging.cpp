// The staged ring policy over MPI (rendezvous sends, real progress rules),
// with a lazy host stream standing in for the GPU: bit-identical to the CPU
// ring. The GPU itself is exercised by tests/cuda_mpi/test_staged.cpp.
#include "ringflow/backends/mpi.hpp"
#include "support/catch.hpp"
#include "support/collect.hpp"
#include "support/staging_checks.hpp"

using namespace ringflow;

TEST_CASE("mpi: staged ring policy matches the CPU ring bit for bit", "[mpi][staging]") {
  auto world = mpi::world();
  testing::failures f;
  testing::check_staged_rings(world, f);
  testing::require_none(f);
}
