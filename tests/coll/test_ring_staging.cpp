// The staged ring policy (coll/ring_staging.hpp: the logic of the GPU staged
// MPI path and the device-direct ring) on thread ranks, with a lazy host
// stream standing in for the GPU: bit-identical to the CPU ring.
#include <chrono>
#include <string>
#include <vector>

#include "support/catch.hpp"
#include "support/collect.hpp"
#include "support/staging_checks.hpp"

using namespace ringflow;
using ringflow::testing::failures;

TEST_CASE("staged ring policy matches the CPU ring bit for bit on 1..5 thread ranks",
          "[coll][staging][sweep]") {
  for (int p = 1; p <= 5; ++p) {
    INFO("ranks " << p);
    testing::require_none(testing::run_collecting(
        p, [](communicator& c, failures& f) { testing::check_staged_rings(c, f); }));
  }
}

TEST_CASE("staged ring policy: a segment larger than its blocks is a usage error",
          "[coll][staging]") {
  auto comms = local::make_group(1);
  testing::lazy_host_ops ops(1);
  detail::staged_ring_memory<testing::lazy_host_ops> m(ops, comms[0].raw(),
                                                       detail::staging_mode::staged, 8, 2);
  std::vector<float> v(4, 1.0f);
  std::vector<request> sends;
  CHECK_THROWS_AS(m.send(comms[0].raw(), static_cast<const float*>(v.data()), 4, 0, 1, sends),
                  usage_error);
}

TEST_CASE("staged ring policy: a neighbour that never comes is a timeout, not a hang",
          "[coll][staging]") {
  // Rank 1 of two never calls: rank 0's polling waits must give up after the
  // transport's timeout with an error naming the rank and what it waited for.
  auto comms = local::make_group(2);
  transport& t = comms[0].raw();
  t.set_timeout(std::chrono::milliseconds(200));
  std::vector<float> v(1000, 1.0f);
  try {
    testing::lazy_host_ops ops(3);
    detail::staged_ring_memory<testing::lazy_host_ops> m(ops, t, detail::staging_mode::staged,
                                                         64 * sizeof(float), 2);
    detail::ring_allreduce_on(m, t, static_cast<const float*>(v.data()), v.data(), v.size(),
                              sum_op{}, 64 * sizeof(float));
    FAIL("the allreduce finished without its neighbour");
  } catch (const timeout_error& e) {
    const std::string what = e.what();
    INFO(what);
    CHECK(what.find("rank 0") != std::string::npos);
    CHECK(what.find("RINGFLOW_TIMEOUT") != std::string::npos);
  }
}

TEST_CASE("direct ring over a device-pointer transport at the sizes that failed on the GPU",
          "[coll][staging][sweep]") {
  // Receives land when their completion is seen, from a copy of their own,
  // while the lazy stream still has work queued: the contract of
  // cuda/ring.hpp, kept by tests/cuda_mpi/test_staged.cpp's transport.
  for (int p : {2, 4}) {
    INFO("ranks " << p);
    testing::require_none(testing::run_collecting(p, [](communicator& c, failures& f) {
      testing::check_direct_large(c, testing::landing::at_completion, f);
    }));
  }
}

TEST_CASE("staged ring checks catch a device-pointer transport whose receives land late",
          "[coll][staging]") {
  // The GPU test transport as it ran on the H200 (commit 40f82bd): a receive
  // said complete while its copy was still in flight, so the reduction read
  // what the slot held before (the previous segment or call: stale partial
  // sums, garbage). The same checks must fail on it, on every rank count
  // that failed there.
  for (int p : {2, 4}) {
    INFO("ranks " << p);
    const failures f = testing::run_collecting(p, [](communicator& c, failures& mine) {
      testing::check_direct_large(c, testing::landing::late, mine);
    });
    UNSCOPED_INFO(f.size() << " wrong results, the first ones:");
    for (std::size_t i = 0; i < f.size() && i < 3; ++i) UNSCOPED_INFO(f[i]);
    CHECK_FALSE(f.empty());
  }
}
