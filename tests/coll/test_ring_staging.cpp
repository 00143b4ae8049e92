// The staged ring policy (coll/ring_staging.hpp: the logic of the GPU staged
// MPI path and the device-direct ring) on thread ranks, with a lazy host
// stream standing in for the GPU: bit-identical to the CPU ring.
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
