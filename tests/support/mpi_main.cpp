// Test entry point for tests run under mpirun: one MPI environment around the
// Catch2 session; the result is agreed across ranks so a failure on any rank
// fails the test on every rank (and ctest sees it).
#if __has_include(<catch2/catch_session.hpp>)
#include <catch2/catch_session.hpp>
#else
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>
#endif

#include <cstdlib>

#include "ringflow/backends/mpi.hpp"
#include "ringflow/coll/collectives.hpp"

int main(int argc, char** argv) {
  setenv("RINGFLOW_CHECK", "1", /*overwrite=*/0);
  ringflow::mpi::environment env(argc, argv);
  auto world = ringflow::mpi::world();
  Catch::Session session;
  // Only rank 0 prints the summary; the others report failures only.
  if (world.rank() != 0) session.configData().showSuccessfulTests = false;
  const int failed = session.run(argc, argv);
  int any_failed = failed != 0 ? 1 : 0;
  ringflow::allreduce(world, std::span<int>(&any_failed, 1), ringflow::max);
  return any_failed ? 1 : 0;
}
