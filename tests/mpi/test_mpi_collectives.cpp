// Collectives over MPI (run under mpirun -np 1..5): the same checks as the
// thread backend, plus the native algorithm and MPI-specific errors.
#include "ringflow/backends/mpi.hpp"
#include "ringflow/backends/mpi_interop.hpp"
#include "ringflow/coll/async.hpp"
#include "support/catch.hpp"
#include "support/coll_checks.hpp"
#include "support/collect.hpp"

using namespace ringflow;
using ringflow::testing::failures;
using ringflow::testing::require_none;

TEST_CASE("mpi: ring collectives match the serial reference for every dtype and op", "[mpi]") {
  auto world = mpi::world();
  failures f;
  testing::check_every_dtype(world, f);
  require_none(f);
}

TEST_CASE("mpi: broadcast from every root", "[mpi]") {
  auto world = mpi::world();
  failures f;
  testing::check_broadcasts(world, f);
  require_none(f);
}

TEST_CASE("mpi: 10^6+3 floats, identical bits on every rank and run", "[mpi]") {
  auto world = mpi::world();
  failures f;
  testing::check_allreduce<float>(world, 1000003, sum, false, coll_options{}, f);
  testing::check_large_bitwise(world, 1000003, f);
  require_none(f);
}

TEST_CASE("mpi: native allreduce agrees with ring for exact inputs", "[mpi]") {
  auto world = mpi::world();
  failures f;
  for (std::size_t count : {std::size_t{0}, std::size_t{1}, std::size_t{4099}}) {
    testing::check_allreduce<float>(world, count, sum, false, coll_options{algo::native, 0}, f);
    testing::check_allreduce<std::int32_t>(world, count, max, true, coll_options{algo::native, 0},
                                           f);
    testing::check_allreduce<double>(world, count, avg, true, coll_options{algo::native, 0}, f);
  }
  require_none(f);
  std::vector<half> h(8);
  REQUIRE_THROWS_AS(allreduce(world, std::span<half>(h), sum, algo::native), not_supported_error);
}

TEST_CASE("mpi: split into even and odd ranks", "[mpi]") {
  auto world = mpi::world();
  communicator sub = world.split(world.rank() % 2, world.rank());
  REQUIRE(sub.valid());
  int v = world.rank();
  allreduce(sub, std::span<int>(&v, 1), sum);
  int want = 0;
  for (int r = world.rank() % 2; r < world.size(); r += 2) want += r;
  CHECK(v == want);
  CHECK(sub.size() == (world.size() + 1 - world.rank() % 2) / 2);
  REQUIRE(mpi::native_handle(sub) != MPI_COMM_NULL);
}

TEST_CASE("mpi: checked mode names the rank with a different count", "[mpi][checked]") {
  auto world = mpi::world();
  if (world.size() < 2) return;
  world.set_checked(true);
  std::vector<float> g(world.rank() == 1 ? 99 : 100, 1.0f);
  try {
    allreduce(world, std::span<float>(g), sum);
    FAIL("expected usage_error");
  } catch (const usage_error& e) {
    const std::string msg = e.what();
    INFO(msg);
    CHECK(msg.find("rank 1 called allreduce(type=float, op=sum, count=99)") != std::string::npos);
  }
  // The communicator stays usable after a detected mismatch.
  int v = 1;
  allreduce(world, std::span<int>(&v, 1), sum);
  CHECK(v == world.size());
}

TEST_CASE("mpi: a message of the wrong size is a comm_error", "[mpi]") {
  auto world = mpi::world();
  if (world.size() < 2) return;
  std::vector<int> v(8, 1);
  if (world.rank() == 0) {
    world.send(std::span<const int>(v), 1, 5);
  } else if (world.rank() == 1) {
    REQUIRE_THROWS_AS(world.recv(std::span<int>(v.data(), 4), 0, 5), comm_error);
  }
  barrier(world);
}

TEST_CASE("mpi: async allreduce overlaps blocking calls and matches them", "[mpi][async]") {
  auto world = mpi::world();
  std::vector<float> a(300001), b;
  for (std::size_t i = 0; i < a.size(); ++i) {
    a[i] = std::cos(static_cast<float>(i) * 0.01f + static_cast<float>(world.rank()));
  }
  b = a;
  auto h = allreduce_async(world, std::span(a), sum);
  allreduce(world, std::span(b), sum);
  h.wait();
  CHECK(std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);
}
