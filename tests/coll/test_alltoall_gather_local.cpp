// alltoall (pairwise, Bruck, auto), alltoallv, gather(v), scatter(v), reduce
// (tree, ring, auto), allgatherv and reduce_scatter_v on 1..8 thread ranks:
// serial references over dtypes, counts and roots, bit identity, the async
// forms, argument errors, mismatches across ranks (an error, never a hang)
// and the cost model's choices.
#include <atomic>
#include <mutex>
#include <string>
#include <vector>

#include "ringflow/backends/local.hpp"
#include "ringflow/coll/async.hpp"
#include "ringflow/coll/cost_model.hpp"
#include "support/catch.hpp"
#include "support/coll_v_checks.hpp"
#include "support/collect.hpp"

using namespace ringflow;
using ringflow::testing::failures;
using ringflow::testing::require_none;
using ringflow::testing::run_collecting;

TEST_CASE("alltoall, gather, scatter, reduce and the v collectives: every dtype on 1..8 ranks",
          "[coll][local][v][sweep]") {
  for (int p = 1; p <= 8; ++p) {
    INFO(p << " ranks");
    require_none(run_collecting(p, [](communicator& c, failures& f) {
      testing::check_v_suite<float>(c, f);
      testing::check_v_suite<double>(c, f);
      testing::check_v_suite<std::int8_t>(c, f);
      testing::check_v_suite<std::uint8_t>(c, f);
      testing::check_v_suite<std::int32_t>(c, f);
      testing::check_v_suite<std::int64_t>(c, f);
      testing::check_v_suite<half>(c, f);
      testing::check_v_suite<bfloat16>(c, f);
    }));
  }
}

// The part of the sweep that also runs under ThreadSanitizer.
TEST_CASE("alltoall, gather, scatter, reduce and the v collectives: float and half",
          "[coll][local][v]") {
  for (int p : {1, 2, 3, 4, 5}) {
    INFO(p << " ranks");
    require_none(run_collecting(p, [](communicator& c, failures& f) {
      testing::check_v_suite<float>(c, f);
      testing::check_v_suite<half>(c, f);
    }));
  }
}

TEST_CASE("reduce and reduce_scatter_v give the same bits on every rank and run",
          "[coll][local][v][bit_identity]") {
  for (int p = 1; p <= 8; ++p) {
    INFO(p << " ranks");
    require_none(run_collecting(p, [](communicator& c, failures& f) {
      testing::check_v_identity_all_ops<float>(c, f);
      testing::check_v_identity_all_ops<double>(c, f);
      testing::check_v_identity_all_ops<half>(c, f);
      testing::check_v_identity_all_ops<bfloat16>(c, f);
    }));
  }
}

TEST_CASE("sparse allreduce sums every rank's rows per index, the same bits everywhere",
          "[coll][local][v][sparse]") {
  for (int p = 1; p <= 8; ++p) {
    INFO(p << " ranks");
    require_none(run_collecting(p, [](communicator& c, failures& f) {
      for (int seed = 0; seed < 3; ++seed) {
        testing::check_sparse_allreduce<float>(c, seed, 3, f);
        testing::check_sparse_allreduce<std::int32_t>(c, seed, 1, f);
        testing::check_sparse_allreduce<half>(c, seed, 4, f);
      }
      testing::check_sparse_allreduce<double>(c, 1, 0, f);
    }));
  }
  // A width that differs on one rank is named on every rank.
  std::atomic<int> named{0};
  CHECK_THROWS_AS(local::run(3,
                             [&](communicator& c) {
                               const std::size_t width = c.rank() == 2 ? 3 : 2;
                               const std::vector<std::int64_t> idx{1};
                               const std::vector<float> rows(width);
                               try {
                                 sparse_allreduce<float>(c, idx, std::span<const float>(rows),
                                                         width);
                               } catch (const usage_error& e) {
                                 // Ranks whose allgather was abandoned carry
                                 // the failing rank's text, which lists all.
                                 if (std::string(e.what()).find("rank 2: 3") != std::string::npos) {
                                   ++named;
                                 }
                                 throw;
                               }
                             }),
                  usage_error);
  CHECK(named == 3);
}

TEST_CASE("the async forms match the blocking calls", "[coll][local][v][async]") {
  for (int p : {1, 3, 4}) {
    INFO(p << " ranks");
    require_none(run_collecting(p, [](communicator& c, failures& f) {
      const int n = c.size(), r = c.rank();
      const auto up = static_cast<std::size_t>(n);
      std::vector<float> in(up * 5), a2a(in.size()), a2av(in.size()), gathered(up * 5);
      std::vector<float> red(in.size()), piece(7), all(up * 7);
      for (std::size_t i = 0; i < in.size(); ++i)
        in[i] = static_cast<float>(r * 100 + static_cast<int>(i));
      std::vector<std::size_t> counts(up, 5), sevens(up, 7);
      std::vector<float> rs_in(up * 7, 1.0f), mine(7, static_cast<float>(r));
      auto h1 = alltoall_async<float>(c, std::span<const float>(in), std::span<float>(a2a));
      auto h2 = alltoallv_async<float>(c, std::span<const float>(in), counts,
                                       detail::packed_displs(counts), std::span<float>(a2av),
                                       counts, detail::packed_displs(counts));
      auto h3 = gather_async<float>(c, std::span<const float>(in.data(), 5),
                                    std::span<float>(gathered), 0);
      auto h4 =
          reduce_async<float>(c, std::span<const float>(in), std::span<float>(red), sum, n - 1);
      auto h5 = reduce_scatter_v_async<float>(c, std::span<const float>(rs_in),
                                              std::span<float>(piece), sevens, sum);
      auto h6 = allgatherv_async<float>(c, std::span<const float>(mine), std::span<float>(all),
                                        sevens, detail::packed_displs(sevens));
      h1.wait(), h2.wait(), h3.wait(), h4.wait(), h5.wait(), h6.wait();
      for (int q = 0; q < n; ++q) {
        for (int j = 0; j < 5; ++j) {
          const float want = static_cast<float>(q * 100 + r * 5 + j);
          const std::size_t at = static_cast<std::size_t>(q * 5 + j);
          if (a2a[at] != want || a2av[at] != want) {
            f.push_back(fmt::format("rank {}: async alltoall(v) element {} wrong", r, at));
            return;
          }
          if (r == 0 && gathered[at] != static_cast<float>(q * 100 + j)) {
            f.push_back(fmt::format("async gather element {} wrong", at));
            return;
          }
          if (r == 0 && all[static_cast<std::size_t>(q * 7 + j)] != static_cast<float>(q)) {
            f.push_back(fmt::format("async allgatherv element {} wrong", q * 7 + j));
            return;
          }
        }
      }
      for (float v : piece) {
        if (v != static_cast<float>(n)) f.push_back("async reduce_scatter_v wrong");
      }
      if (r == n - 1) {
        for (std::size_t i = 0; i < red.size(); ++i) {
          const float want = static_cast<float>(100 * n * (n - 1) / 2 + n * static_cast<int>(i));
          if (red[i] != want) {
            f.push_back(fmt::format("async reduce element {} = {}, want {}", i, red[i], want));
            return;
          }
        }
      }
    }));
  }
}

TEST_CASE("bad arguments are usage errors before any message", "[coll][local][v][errors]") {
  require_none(run_collecting(3, [](communicator& c, failures& f) {
    std::vector<float> a(7), b(7), six(6), big(9);
    const std::vector<std::size_t> three(3, 2), two(2, 1);
    auto expect = [&](const char* what, auto&& fn) {
      try {
        fn();
        f.push_back(fmt::format("{}: no usage_error", what));
      } catch (const usage_error& e) {
        if (std::string(e.what()).find("rank") == std::string::npos) {
          f.push_back(fmt::format("{}: the message names no rank: {}", what, e.what()));
        }
      }
    };
    expect("alltoall of 7 on 3 ranks",
           [&] { alltoall<float>(c, std::span<const float>(a), std::span<float>(b)); });
    expect("alltoall in place",
           [&] { alltoall<float>(c, std::span<const float>(six), std::span<float>(six)); });
    expect("alltoallv with 2 counts", [&] {
      alltoallv<float>(c, std::span<const float>(six), two, std::span<float>(six), two);
    });
    expect("alltoallv past the end", [&] {
      const std::vector<std::size_t> many(3, 5);
      alltoallv<float>(c, std::span<const float>(six), many, std::span<float>(big), many);
    });
    expect("gather with a bad root",
           [&] { gather<float>(c, std::span<const float>(a), std::span<float>(b), 3); });
    expect("scatter with a short input on the root", [&] {
      scatter<float>(c, std::span<const float>(a), std::span<float>(b.data(), 3), c.rank());
    });
    expect("reduce with a short output on the root", [&] {
      reduce<float>(c, std::span<const float>(a), std::span<float>(six), sum, c.rank());
    });
    expect("allgatherv whose input is not counts[rank]",
           [&] { allgatherv<float>(c, std::span<const float>(a), std::span<float>(big), three); });
    expect("reduce_scatter_v whose input is not the sum of the counts", [&] {
      reduce_scatter_v<float>(c, std::span<const float>(a), std::span<float>(b.data(), 2), three,
                              sum);
    });
    try {
      reduce<float>(c, std::span<const float>(a), std::span<float>(b), sum, 0,
                    coll_options{algo::halving_doubling, 0});
      f.push_back("reduce with halving_doubling: no not_supported_error");
    } catch (const not_supported_error&) {}
    // Nothing was sent: the group still works.
    int v = 1;
    allreduce(c, std::span<int>(&v, 1), sum);
    if (v != 3) f.push_back("the group broke after usage errors");
  }));
}

namespace {
// Runs `fn` on `n` ranks; every rank's error text (the run must throw).
template <class Fn>
std::vector<std::string> errors_of(int n, Fn fn) {
  std::mutex m;
  std::vector<std::string> messages;
  std::atomic<bool> threw{false};
  try {
    local::run(n, [&](communicator& c) {
      try {
        fn(c);
      } catch (const error& e) {
        std::lock_guard lock(m);
        messages.push_back(e.what());
        throw;
      }
    });
  } catch (const error&) {
    threw = true;
  }
  CHECK(threw);
  return messages;
}

bool any_contains(const std::vector<std::string>& all, std::string_view what) {
  for (const auto& s : all) {
    if (s.find(what) != std::string::npos) return true;
  }
  return false;
}

void show(const std::vector<std::string>& all) {
  for (const auto& s : all) UNSCOPED_INFO(s);
}
}  // namespace

TEST_CASE("mismatched calls across ranks are errors naming the rank, not hangs",
          "[coll][local][v][checked]") {
  SECTION("alltoall: a different count per peer on one rank") {
    for (alltoall_algo a : {alltoall_algo::pairwise, alltoall_algo::bruck}) {
      const auto m = errors_of(3, [a](communicator& c) {
        const std::size_t count = c.rank() == 1 ? 5 : 4;
        std::vector<float> in(3 * count), out(3 * count);
        alltoall<float>(c, std::span<const float>(in), std::span<float>(out), alltoall_options{a});
      });
      show(m);
      CHECK(any_contains(m, "collective mismatch"));
      CHECK(any_contains(m, "rank 1 called alltoall(type=float, count per peer=5)"));
    }
  }
  SECTION("alltoall: a count of 0 on one rank still meets the others' messages") {
    const auto m = errors_of(4, [](communicator& c) {
      const std::size_t count = c.rank() == 2 ? 0 : 3;
      std::vector<float> in(4 * count), out(4 * count);
      alltoall<float>(c, std::span<const float>(in), std::span<float>(out));
    });
    show(m);
    CHECK(any_contains(m, "count per peer=0"));
  }
  SECTION("alltoall: another dtype") {
    const auto m = errors_of(2, [](communicator& c) {
      if (c.rank() == 0) {
        std::vector<double> in(4), out(4);
        alltoall<double>(c, std::span<const double>(in), std::span<double>(out));
      } else {
        std::vector<float> in(4), out(4);
        alltoall<float>(c, std::span<const float>(in), std::span<float>(out));
      }
    });
    show(m);
    CHECK(any_contains(m, "alltoall(type=double"));
  }
  SECTION("alltoallv: what rank 0 sends rank 1 differs from what rank 1 expects") {
    const auto m = errors_of(3, [](communicator& c) {
      std::vector<std::size_t> sc(3, 2), rc(3, 2);
      if (c.rank() == 0) sc[1] = 3;
      std::vector<float> in(7), out(6);
      alltoallv<float>(c, std::span<const float>(in), sc, std::span<float>(out), rc);
    });
    show(m);
    CHECK(any_contains(m, "message size mismatch from rank 0 to rank 1"));
  }
  SECTION("gatherv: the root expects another count than a rank sends") {
    const auto m = errors_of(3, [](communicator& c) {
      std::vector<float> in(c.rank() == 2 ? 4 : 3), out(9);
      const std::vector<std::size_t> counts(3, 3);
      gatherv<float>(c, std::span<const float>(in), std::span<float>(out), counts, 0);
    });
    show(m);
    CHECK(any_contains(m, "from rank 2 to rank 0"));
  }
  SECTION("scatterv: a rank expects another count than the root sends") {
    const auto m = errors_of(3, [](communicator& c) {
      std::vector<float> in(9), out(c.rank() == 1 ? 2 : 3);
      const std::vector<std::size_t> counts(3, 3);
      scatterv<float>(c, std::span<const float>(in), counts, std::span<float>(out), 0);
    });
    show(m);
    CHECK(any_contains(m, "from rank 0 to rank 1"));
  }
  SECTION("allgatherv: the same total but other counts on one rank") {
    const auto m = errors_of(3, [](communicator& c) {
      std::vector<std::size_t> counts{3, 3, 3};
      if (c.rank() == 2) counts = {2, 4, 3};
      std::vector<float> in(3), out(9);
      allgatherv<float>(c, std::span<const float>(in), std::span<float>(out), counts);
    });
    show(m);
    CHECK(any_contains(m, "collective mismatch"));
    CHECK(any_contains(m, "allgatherv(type=float, count=9, counts hash="));
  }
  SECTION("reduce_scatter_v: other counts on one rank") {
    const auto m = errors_of(2, [](communicator& c) {
      std::vector<std::size_t> counts{2, 3};
      if (c.rank() == 1) counts = {1, 4};
      std::vector<float> in(5), out(counts[static_cast<std::size_t>(c.rank())]);
      reduce_scatter_v<float>(c, std::span<const float>(in), std::span<float>(out), counts, sum);
    });
    show(m);
    CHECK(any_contains(m, "reduce_scatter_v(type=float, op=sum, count=5, counts hash="));
  }
  SECTION("reduce: another op or count") {
    const auto m = errors_of(3, [](communicator& c) {
      std::vector<float> in(c.rank() == 2 ? 11 : 10), out(in.size());
      reduce<float>(c, std::span<const float>(in), std::span<float>(out), sum, 0);
    });
    show(m);
    CHECK(any_contains(m, "rank 2 called reduce(type=float, op=sum, root=0, count=11)"));
  }
  SECTION("full check: another root is named on every rank") {
    std::mutex mu;
    std::vector<std::string> m;
    try {
      local::run(3, [&](communicator& c) {
        c.set_checked(true);
        std::vector<float> in(4), out(12);
        try {
          gather<float>(c, std::span<const float>(in), std::span<float>(out),
                        c.rank() == 2 ? 1 : 0);
        } catch (const usage_error& e) {
          std::lock_guard lock(mu);
          m.push_back(e.what());
          throw;
        }
      });
    } catch (const usage_error&) {}
    show(m);
    REQUIRE(m.size() == 3);
    for (const auto& s : m) {
      CHECK(s.find("rank 2 called gather(type=float, root=1, count per rank=4)") !=
            std::string::npos);
    }
  }
}

TEST_CASE("the cost model picks Bruck for small alltoalls and the ring reduce for large ones",
          "[coll][cost_model][v]") {
  const cost_model m = builtin_cost_model();
  cluster_shape eight{8, 1, 8, 8, false};
  CHECK(choose_alltoall(m, eight, 1024) == alltoall_algo::bruck);
  CHECK(choose_alltoall(m, eight, 64 << 20) == alltoall_algo::pairwise);
  cluster_shape two{2, 1, 2, 2, false};
  // On two ranks both send one message; pairwise copies nothing.
  for (std::size_t b : {std::size_t{8}, std::size_t{1} << 20}) {
    CHECK(choose_alltoall(m, two, b) == alltoall_algo::pairwise);
  }
  CHECK(predict_alltoall_seconds(alltoall_algo::automatic, m, eight, 1024) < 0);
  cluster_shape four{4, 1, 4, 4, false};
  CHECK(choose_reduce(m, four, 1024) == algo::tree);
  CHECK(choose_reduce(m, four, 16 << 20) == algo::ring);
  CHECK(predict_reduce_seconds(algo::halving_doubling, m, four, 1024) < 0);
}
