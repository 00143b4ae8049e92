// sparse_allreduce on 1..8 thread ranks: the Bruck allgatherv it is built
// on (uneven blocks, empty ones), the packed sparse path and the dense
// fallback against a serial sum, the crossover rule, the byte counts, and
// the errors every rank reports (width, options, indices outside the table).
#include <atomic>
#include <string>
#include <vector>

#include "ringflow/backends/local.hpp"
#include "ringflow/coll/sparse.hpp"
#include "support/catch.hpp"
#include "support/coll_v_checks.hpp"
#include "support/collect.hpp"

using namespace ringflow;
using ringflow::testing::failures;
using ringflow::testing::require_none;
using ringflow::testing::run_collecting;

namespace {
// Rank q's block in the Bruck tests: (q * 5 + salt) % 4 elements, so some
// ranks have none (and with salt 3 rank 0 has 3, rank 1 none, ...).
std::size_t block_count(int q, int salt) { return static_cast<std::size_t>((q * 5 + salt) % 4); }
std::int64_t block_value(int q, std::size_t i) { return q * 1000 + static_cast<std::int64_t>(i); }

// Runs `body` on n ranks and returns how many ranks threw a usage_error
// whose text holds `needle`.
template <class Body>
int ranks_naming(int n, const std::string& needle, Body body) {
  std::atomic<int> named{0};
  try {
    local::run(n, [&](communicator& c) {
      try {
        body(c);
      } catch (const usage_error& e) {
        if (std::string(e.what()).find(needle) != std::string::npos) ++named;
        throw;
      }
    });
  } catch (const usage_error&) {}
  return named;
}
}  // namespace

TEST_CASE("bruck allgatherv: uneven and empty blocks land packed on every rank",
          "[coll][local][v][sparse]") {
  for (int p = 1; p <= 8; ++p) {
    INFO(p << " ranks");
    for (int salt = 0; salt < 4; ++salt) {
      require_none(run_collecting(p, [salt](communicator& c, failures& f) {
        const int n = c.size(), r = c.rank();
        std::vector<std::size_t> counts;
        std::vector<std::int64_t> want;
        for (int q = 0; q < n; ++q) {
          counts.push_back(block_count(q, salt));
          for (std::size_t i = 0; i < counts.back(); ++i) want.push_back(block_value(q, i));
        }
        std::vector<std::int64_t> mine;
        for (std::size_t i = 0; i < block_count(r, salt); ++i) mine.push_back(block_value(r, i));
        std::vector<std::int64_t> got(want.size(), -1);
        detail::bruck_allgatherv(c.raw(), mine.data(), got.data(), counts.data());
        if (got != want)
          f.push_back(fmt::format("rank {} of {} salt {}: wrong result", r, n, salt));
      }));
    }
  }
}

TEST_CASE("sparse allreduce: the packed and the dense path against a serial sum on 1..8 ranks",
          "[coll][local][v][sparse]") {
  for (int p = 1; p <= 8; ++p) {
    INFO(p << " ranks");
    require_none(run_collecting(p, [](communicator& c, failures& f) {
      for (int seed = 0; seed < 4; ++seed) {  // odd seeds: rank 1 passes no rows
        for (const auto how :
             {sparse_reduction::sparse, sparse_reduction::dense, sparse_reduction::automatic}) {
          const sparse_allreduce_options opt{41, how};
          testing::check_sparse_allreduce<float>(c, seed, 3, f, opt);
          testing::check_sparse_allreduce<std::int32_t>(c, seed, 1, f, opt);
          testing::check_sparse_allreduce<half>(c, seed, 5, f, opt);  // padded block
          testing::check_sparse_allreduce<std::int64_t>(c, seed, 3, f, opt);
        }
      }
      testing::check_sparse_allreduce<double>(c, 1, 0, f, {41, sparse_reduction::dense});
    }));
  }
}

TEST_CASE("sparse allreduce: no rows anywhere, or all rows on one rank", "[coll][local][sparse]") {
  for (int p = 1; p <= 8; ++p) {
    INFO(p << " ranks");
    for (const auto how : {sparse_reduction::sparse, sparse_reduction::dense}) {
      std::vector<sparse_rows<float>> none(static_cast<std::size_t>(p)),
          one(static_cast<std::size_t>(p));
      local::run(p, [&](communicator& c) {
        const auto r = static_cast<std::size_t>(c.rank());
        none[r] = sparse_allreduce<float>(c, {}, {}, 2, {10, how});
        std::vector<std::int64_t> idx;
        std::vector<float> rows;
        if (r == static_cast<std::size_t>(p - 1)) {
          idx = {7, 2, 7};
          rows = {1, 2, 3, 4, 5, 6};
        }
        one[r] = sparse_allreduce<float>(c, idx, std::span<const float>(rows), 2, {10, how});
      });
      for (int r = 0; r < p; ++r) {
        const auto ur = static_cast<std::size_t>(r);
        CHECK(none[ur].indices.empty());
        CHECK(none[ur].values.empty());
        CHECK(none[ur].dense == (how == sparse_reduction::dense));
        CHECK(one[ur].indices == std::vector<std::int64_t>{2, 7});
        CHECK(one[ur].values == std::vector<float>{3, 4, 6, 8});
        CHECK(one[ur].rank_rows.size() == static_cast<std::size_t>(p));
        CHECK(one[ur].rank_rows.back() == 3);
      }
    }
  }
}

TEST_CASE("sparse allreduce: automatic takes the dense path past the byte crossover",
          "[coll][local][sparse]") {
  // 3 ranks, float rows of 4: a block of n rows is n + 2n words; dense
  // when 8 * 3 * (sum n) > 2 * table_rows * 17, i.e. sum n > 17/12 table_rows.
  const std::vector<std::size_t> few{4, 4, 4}, many{6, 6, 6};
  CHECK_FALSE(sparse_allreduce_prefers_dense(few, 4, 4, 12));  // 12 rows, 288 <= 408 bytes
  CHECK(sparse_allreduce_prefers_dense(many, 4, 4, 12));       // 18 rows, 432 > 408
  CHECK_FALSE(sparse_allreduce_prefers_dense(many, 4, 4, 0));  // no table_rows: never
  CHECK_FALSE(sparse_allreduce_prefers_dense(std::vector<std::size_t>{100}, 4, 4, 1));  // 1 rank
  for (const std::size_t per_rank : {4, 6}) {
    std::vector<sparse_rows<float>> got(3);
    local::run(3, [&](communicator& c) {
      std::vector<std::int64_t> idx;
      std::vector<float> rows;
      for (std::size_t k = 0; k < per_rank; ++k) {
        idx.push_back(static_cast<std::int64_t>((k * 5 + static_cast<std::size_t>(c.rank())) % 12));
        for (int j = 0; j < 4; ++j) rows.push_back(static_cast<float>(c.rank() + j));
      }
      got[static_cast<std::size_t>(c.rank())] =
          sparse_allreduce<float>(c, idx, std::span<const float>(rows), 4, {.table_rows = 12});
    });
    INFO(per_rank << " rows per rank");
    for (const auto& g : got) {
      CHECK(g.dense == (per_rank == 6));
      CHECK(g.indices == got[0].indices);
      CHECK(g.values == got[0].values);
      CHECK(g.table_rows == 12);
    }
    // The bytes follow the path taken.
    CHECK(sparse_allreduce_bytes_sent(got[0], 0) ==
          (per_rank == 6 ? sparse_allreduce_dense_bytes_sent(12, 4, 4, 3, 0)
                         : sparse_allreduce_bytes_sent(got[0].rank_rows, 4, 4, 0)));
  }
}

TEST_CASE("sparse_allreduce_bytes_sent: the Bruck gathers and the dense fallback",
          "[coll][local][sparse]") {
  // 3 ranks of 3, 0 and 5 float rows of 4: blocks of 3 + 6, 0 and 5 + 10 words.
  // Rounds d = 1 (n = 1: the own block), d = 2 (n = 1: the own block again).
  const std::vector<std::size_t> rows = {3, 0, 5};
  const std::uint64_t shapes = 2 * 5 * 8;
  CHECK(sparse_allreduce_bytes_sent(rows, 4, 4, 0) == shapes + 2 * 9 * 8);
  CHECK(sparse_allreduce_bytes_sent(rows, 4, 4, 1) == shapes);
  CHECK(sparse_allreduce_bytes_sent(rows, 4, 4, 2) == shapes + 2 * 15 * 8);
  // 4 ranks: d = 1 sends the own block, d = 2 the own and the left one's.
  const std::vector<std::size_t> four = {1, 2, 3, 4};  // half rows of 3
  auto w = [](std::size_t n) { return sparse_block_words(n, 3, 2); };
  CHECK(w(1) == 2);
  CHECK(w(3) == 6);  // 3 indices, 18 bytes of rows padded to 24
  CHECK(sparse_allreduce_bytes_sent(four, 3, 2, 0) == 3 * 5 * 8 + (2 * w(1) + w(4)) * 8);
  CHECK(sparse_allreduce_bytes_sent(four, 3, 2, 2) == 3 * 5 * 8 + (2 * w(3) + w(2)) * 8);
  CHECK(sparse_allreduce_bytes_sent(std::vector<std::size_t>{7}, 4, 4, 0) == 0);
  // Dense: shapes, then ring allreduces of 10 x 4 floats and 10 touched bytes
  // (pieces of 14, 13, 13 floats and 4, 3, 3 bytes over 3 ranks).
  CHECK(sparse_allreduce_dense_bytes_sent(10, 4, 4, 3, 0) == shapes + (26 + 27) * 4 + (6 + 7));
  CHECK(sparse_allreduce_dense_bytes_sent(10, 4, 4, 1, 0) == 0);
}

TEST_CASE("sparse allreduce: every rank names what differs", "[coll][local][sparse]") {
  // A width that differs on one rank (the existing case in
  // test_alltoall_gather_local.cpp) ...
  CHECK(ranks_naming(4, "rank 2: 3", [](communicator& c) {
          const std::size_t width = c.rank() == 2 ? 3 : 2;
          const std::vector<std::int64_t> idx{1};
          const std::vector<float> rows(width);
          sparse_allreduce<float>(c, idx, std::span<const float>(rows), width);
        }) == 4);
  // ... a table_rows that differs ...
  CHECK(ranks_naming(3, "table_rows rank 0: 8, rank 1: 9", [](communicator& c) {
          const std::vector<std::int64_t> idx{1};
          const std::vector<float> rows(2);
          sparse_allreduce<float>(c, idx, std::span<const float>(rows), 2,
                                  {.table_rows = c.rank() == 1 ? 9u : 8u});
        }) == 3);
  // ... an index outside the table on one rank ...
  CHECK(ranks_naming(3, "rank 1: 1", [](communicator& c) {
          const std::vector<std::int64_t> idx{c.rank() == 1 ? 8 : 7};
          const std::vector<float> rows(2);
          sparse_allreduce<float>(c, idx, std::span<const float>(rows), 2, {.table_rows = 8});
        }) == 3);
  // ... and the dense path without the table's row count.
  CHECK(ranks_naming(2, "needs the table's row count", [](communicator& c) {
          sparse_allreduce<float>(c, {}, {}, 2, {.reduction = sparse_reduction::dense});
        }) == 2);
}
