// MPI errors become ringflow::mpi_error: a comm_error that carries MPI's
// error code and class, with a message naming the call, the rank and the peer.
#include <fmt/format.h>
#include <mpi.h>

#include <cstddef>
#include <string>
#include <vector>

#include "ringflow/backends/mpi.hpp"
#include "ringflow/coll/collectives.hpp"
#include "support/catch.hpp"

using namespace ringflow;

namespace {
bool contains(const std::string& s, const std::string& part) {
  return s.find(part) != std::string::npos;
}
}  // namespace

TEST_CASE("mpi: a failed MPI call throws mpi_error with MPI's code", "[mpi][errors]") {
  communicator world = mpi::world();
  std::vector<std::byte> buf(16);
  // The transport passes peers through to MPI (the communicator's typed
  // send checks them first): MPI_Isend to a rank that does not exist fails
  // with MPI_ERR_RANK under the communicator's MPI_ERRORS_RETURN.
  const int bad_peer = world.size() + 3;
  const int user_tag = 7;  // a user message: its failure breaks nothing else
  std::string what;
  int code = MPI_SUCCESS, cls = MPI_SUCCESS;
  try {
    request r = world.raw().isend(buf.data(), buf.size(), bad_peer, user_tag);
    r.wait();
  } catch (const mpi_error& e) {
    what = e.what();
    code = e.mpi_code();
    cls = e.mpi_class();
  }
  INFO(what);
  CHECK(code != MPI_SUCCESS);
  CHECK(cls == MPI_ERR_RANK);
  int expected_class = MPI_SUCCESS;
  MPI_Error_class(code, &expected_class);
  CHECK(cls == expected_class);
  CHECK(contains(what, "MPI_Isend"));
  CHECK(contains(what, fmt::format("failed on rank {} (peer {})", world.rank(), bad_peer)));

  // Still a comm_error, for code that catches those.
  CHECK_THROWS_AS(world.raw().irecv(buf.data(), buf.size(), bad_peer, user_tag), comm_error);

  // The communicator is still usable.
  int one = 1;
  allreduce(world, std::span<int>(&one, 1), sum);
  CHECK(one == world.size());
}
