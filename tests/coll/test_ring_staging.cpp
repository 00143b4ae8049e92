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
          "[coll][staging]") {
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
