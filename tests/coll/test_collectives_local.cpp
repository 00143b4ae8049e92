// Collectives on the thread backend: every dtype x op x count, 1..8 ranks.
#include <atomic>
#include <mutex>

#include "ringflow/backends/local.hpp"
#include "support/catch.hpp"
#include "support/coll_checks.hpp"
#include "support/collect.hpp"

using namespace ringflow;
using ringflow::testing::failures;
using ringflow::testing::require_none;
using ringflow::testing::run_collecting;

TEST_CASE("partition is balanced and covers the buffer", "[coll][partition]") {
  for (std::size_t count : {0, 1, 5, 8, 1000003}) {
    for (int p = 1; p <= 8; ++p) {
      std::size_t next = 0;
      for (int r = 0; r < p; ++r) {
        const chunk c = partition(count, p, r);
        REQUIRE(c.offset == next);
        REQUIRE((c.count == count / p || c.count == count / p + 1));
        next += c.count;
      }
      REQUIRE(next == count);
    }
  }
}

TEST_CASE("ring collectives match the serial reference for every dtype and op",
          "[coll][local][sweep]") {
  for (int p = 1; p <= 8; ++p) {
    INFO("ranks = " << p);
    require_none(
        run_collecting(p, [](communicator& c, failures& f) { testing::check_every_dtype(c, f); }));
  }
}

TEST_CASE("broadcast from every root, tree and chain", "[coll][local]") {
  for (int p : {1, 2, 3, 5, 8}) {
    INFO("ranks = " << p);
    require_none(
        run_collecting(p, [](communicator& c, failures& f) { testing::check_broadcasts(c, f); }));
  }
}

TEST_CASE("large allreduce: 10^6+3 floats, identical bits on every rank and run", "[coll][local]") {
  for (int p : {2, 3, 4}) {
    INFO("ranks = " << p);
    require_none(run_collecting(p, [](communicator& c, failures& f) {
      testing::check_allreduce<float>(c, 1000003, sum, false, coll_options{}, f);
      testing::check_allreduce<float>(c, 1000003, avg, true, coll_options{}, f);
      testing::check_large_bitwise(c, 1000003, f);
    }));
  }
}

TEST_CASE("barrier orders work across ranks", "[coll][local]") {
  for (int p : {1, 2, 5}) {
    std::atomic<int> arrived{0};
    failures f = run_collecting(p, [&](communicator& c, failures& out) {
      for (int round = 1; round <= 20; ++round) {
        arrived.fetch_add(1);
        barrier(c);
        if (arrived.load() < round * c.size()) {
          out.push_back(fmt::format("rank {} left barrier {} early", c.rank(), round));
        }
        barrier(c);
      }
    });
    require_none(f);
  }
}

TEST_CASE("collectives reject bad arguments with usage_error", "[coll][errors]") {
  // Local argument errors are thrown before any communication, so one rank
  // of a group can be probed alone from the test thread.
  auto comms = local::make_group(2);
  const communicator& c = comms[0];
  std::vector<float> a(10), b(9);
  REQUIRE_THROWS_AS(allreduce(c, std::span<const float>(a), std::span<float>(b), sum), usage_error);
  std::vector<float> piece(3);
  REQUIRE_THROWS_AS(reduce_scatter(c, std::span<const float>(a), std::span<float>(piece), sum),
                    usage_error);
  REQUIRE_THROWS_AS(allgather(c, std::span<const float>(piece), std::span<float>(a)), usage_error);
  REQUIRE_THROWS_AS(broadcast(c, std::span<float>(a), 2), usage_error);
  REQUIRE_THROWS_AS(
      allreduce(c, std::span<const float>(a.data(), 5), std::span<float>(a.data() + 2, 5), sum),
      usage_error);
}

TEST_CASE("native algorithm is not supported on the local backend", "[coll][errors]") {
  REQUIRE_THROWS_AS(local::run(2,
                               [](communicator& c) {
                                 std::vector<float> a(4, 1.0f);
                                 allreduce(c, std::span<float>(a), sum, algo::native);
                               }),
                    not_supported_error);
}
