// reduce_scatter by recursive halving and allgather by recursive doubling
// (algo::halving_doubling; allgather also recursive_doubling) on 1..8
// thread ranks: every dtype x op x interesting count, in and out of place,
// against the serial reference; the ring for non-power-of-two counts.
#include <string>

#include "ringflow/backends/local.hpp"
#include "ringflow/coll/recursive_halving.hpp"
#include "support/catch.hpp"
#include "support/coll_checks.hpp"
#include "support/collect.hpp"

using namespace ringflow;
using ringflow::testing::failures;
using ringflow::testing::require_none;
using ringflow::testing::run_collecting;

namespace {

template <class T, class Op>
void scatter_counts(const communicator& c, const Op& op, algo a, failures& f) {
  for (std::size_t count : testing::interesting_counts(c.size())) {
    testing::check_reduce_scatter<T>(c, count, op, false, coll_options{a, 0}, f);
    testing::check_reduce_scatter<T>(c, count, op, true, coll_options{a, 0}, f);
  }
}

template <class T>
void every_op(const communicator& c, algo a, failures& f) {
  scatter_counts<T>(c, sum, a, f);
  scatter_counts<T>(c, prod, a, f);
  scatter_counts<T>(c, min, a, f);
  scatter_counts<T>(c, max, a, f);
  scatter_counts<T>(c, avg, a, f);
  for (std::size_t count : testing::interesting_counts(c.size())) {
    testing::check_allgather<T>(c, count, false, coll_options{a, 0}, f);
    testing::check_allgather<T>(c, count, true, coll_options{a, 0}, f);
  }
}

void every_dtype(const communicator& c, algo a, failures& f) {
  every_op<float>(c, a, f);
  every_op<double>(c, a, f);
  every_op<std::int8_t>(c, a, f);
  every_op<std::uint8_t>(c, a, f);
  every_op<std::int32_t>(c, a, f);
  every_op<std::int64_t>(c, a, f);
  every_op<half>(c, a, f);
  every_op<bfloat16>(c, a, f);
}

}  // namespace

TEST_CASE("recursive halving reduce_scatter and doubling allgather match the reference",
          "[coll][local][algorithms][scatter_gather]") {
  for (int p = 1; p <= 8; ++p) {
    INFO(p << " ranks (" << (detail::recursive_halving_fits(p) ? "recursive" : "ring fallback")
           << ")");
    require_none(run_collecting(p, [](communicator& c, failures& f) {
      every_dtype(c, algo::halving_doubling, f);
      // allgather also answers to recursive_doubling.
      testing::check_allgather<float>(c, 4099, false, coll_options{algo::recursive_doubling, 0}, f);
      testing::check_allgather<float>(c, 4099, true, coll_options{algo::recursive_doubling, 0}, f);
    }));
  }
}

TEST_CASE("recursive halving gives every rank the same bits run after run",
          "[coll][local][algorithms][scatter_gather]") {
  // A float sum whose rounding depends on the order: reduce-scatter then
  // allgather twice; every rank must hold the same buffer both times.
  for (int p : {2, 4, 8}) {
    INFO(p << " ranks");
    std::vector<std::vector<float>> results(static_cast<std::size_t>(p));
    for (int run = 0; run < 2; ++run) {
      require_none(run_collecting(p, [&](communicator& c, failures& f) {
        const std::size_t n = 100003;
        std::vector<float> in(n), all(n);
        for (std::size_t i = 0; i < n; ++i) {
          in[i] = 1.0f /
                  static_cast<float>(1 + (i * 7 + static_cast<std::size_t>(c.rank()) * 13) % 1000);
        }
        const chunk own = partition(n, c.size(), c.rank());
        reduce_scatter(c, std::span<const float>(in),
                       std::span<float>(all.data() + own.offset, own.count), sum,
                       coll_options{algo::halving_doubling, 0});
        allgather(c, std::span<const float>(all.data() + own.offset, own.count),
                  std::span<float>(all), coll_options{algo::halving_doubling, 0});
        auto& keep = results[static_cast<std::size_t>(c.rank())];
        if (run == 1 && keep != all) f.push_back(fmt::format("rank {}: bits changed", c.rank()));
        keep = all;
      }));
    }
    for (int r = 1; r < p; ++r) CHECK(results[static_cast<std::size_t>(r)] == results[0]);
  }
}

TEST_CASE("reduce_scatter refuses recursive_doubling, allgather the trees",
          "[coll][errors][scatter_gather]") {
  auto comms = local::make_group(1);
  std::vector<float> a(4, 1.0f), b(4);
  try {
    reduce_scatter(comms[0], std::span<const float>(a), std::span<float>(b), sum,
                   coll_options{algo::recursive_doubling, 0});
    FAIL("accepted");
  } catch (const not_supported_error& e) {
    CHECK(std::string(e.what()).find("algo::halving_doubling") != std::string::npos);
  }
  CHECK_THROWS_AS(allgather(comms[0], std::span<const float>(a), std::span<float>(b),
                            coll_options{algo::tree, 0}),
                  not_supported_error);
}
