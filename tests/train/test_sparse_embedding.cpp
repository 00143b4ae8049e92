// data_parallel with an ad::embedding table on the thread backend: its sparse
// row gradients are reduced by sparse_allreduce and the run equals the same
// model trained with dense gradient reduction (bitwise where the sums cannot
// round differently, to 1e-6 otherwise), at 1..4 ranks.
#include <cmath>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

#include "ringflow/backends/local.hpp"
#include "ringflow/coll/sparse.hpp"
#include "ringflow/train/sharded_data_parallel.hpp"
#include "support/catch.hpp"
#include "support/embedding_training.hpp"

using namespace ringflow;
using testing::id_overlap;
using testing::train_embedding_model;

namespace {
template <class Body>
std::vector<testing::embedding_run> per_rank(int n, Body body) {
  std::vector<testing::embedding_run> out(static_cast<std::size_t>(n));
  local::run(n, [&](communicator& c) { out[static_cast<std::size_t>(c.rank())] = body(c); });
  return out;
}

bool bitwise_equal(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}
}  // namespace

TEST_CASE("sparse embedding: data_parallel with sparse reduction equals dense reduction",
          "[train][embedding]") {
  for (int n = 1; n <= 4; ++n) {
    for (const auto overlap : {id_overlap::pairs, id_overlap::all}) {
      for (const int skip : {-1, n - 1}) {
        INFO("ranks " << n << " overlap " << (overlap == id_overlap::pairs ? "pairs" : "all")
                      << " skip rank " << skip);
        const auto sparse = per_rank(
            n, [&](communicator& c) { return train_embedding_model(c, true, 6, overlap, skip); });
        const auto dense = per_rank(
            n, [&](communicator& c) { return train_embedding_model(c, false, 6, overlap, skip); });
        for (int r = 0; r < n; ++r) {
          const auto ur = static_cast<std::size_t>(r);
          // Identical on every rank, in both modes.
          CHECK(bitwise_equal(sparse[ur].values, sparse[0].values));
          CHECK(bitwise_equal(dense[ur].values, dense[0].values));
          if (overlap == id_overlap::pairs || n <= 2) CHECK(sparse[ur].losses == dense[ur].losses);
        }
        // Training moved the parameters at all.
        const auto init = per_rank(
            1, [&](communicator& c) { return train_embedding_model(c, true, 0, overlap); });
        CHECK(!bitwise_equal(sparse[0].values, init[0].values));
        if (overlap == id_overlap::pairs || n <= 2) {
          // Each row's gradient is a sum of at most two ranks' rows (plus zeros):
          // a + b is the same bits in any order, so sparse == dense exactly.
          CHECK(bitwise_equal(sparse[0].values, dense[0].values));
        } else {
          double worst = 0;
          for (std::size_t i = 0; i < sparse[0].values.size(); ++i) {
            const double a = sparse[0].values[i], b = dense[0].values[i];
            worst = std::max(worst, std::abs(a - b) / (1.0 + std::abs(b)));
          }
          INFO("largest relative difference " << worst);
          CHECK(worst <= 1e-6);
        }
        if (n > 1) {
          // The table's 96 x 4 floats are not in the dense buckets any more.
          CHECK(sparse[0].bytes_sent < dense[0].bytes_sent);
        } else {
          CHECK(sparse[0].bytes_sent == 0);
        }
      }
    }
  }
}

TEST_CASE("sparse embedding: the table leaves the dense buckets; the rest keeps its plan",
          "[train][embedding]") {
  // One bucket per parameter: 5 parameters, the sparse table has none.
  train::data_parallel_options opts;
  opts.bucket_cap_bytes = 0;
  opts.first_bucket_cap_bytes = 0;
  const auto runs = per_rank(2, [&](communicator& c) {
    auto s = train_embedding_model(c, true, 1, id_overlap::all, -1, opts);
    auto d = train_embedding_model(c, false, 1, id_overlap::all, -1, opts);
    s.losses.push_back(static_cast<float>(d.buckets));
    return s;
  });
  CHECK(runs[0].buckets == 4);
  CHECK(runs[0].losses.back() == 5.0f);
  // And a big first bucket holding the table and the mlp is cut around it.
  const auto one = per_rank(2, [&](communicator& c) {
    train::data_parallel_options big;
    big.bucket_cap_bytes = big.first_bucket_cap_bytes = 1 << 20;
    return train_embedding_model(c, true, 1, id_overlap::all, -1, big);
  });
  CHECK(one[0].buckets == 1);
}

TEST_CASE("sparse embedding: bad ids name the rank; the sharded trainer refuses sparse tables",
          "[train][embedding][errors]") {
  std::mutex m;
  std::vector<std::string> messages(2);
  local::run(2, [&](communicator& c) {
    ad::sequential net;
    auto& emb = net.add(ad::embedding(10, 2, 1));
    train::data_parallel dp(c, net.parameters());
    std::string what;
    try {
      const std::vector<std::int64_t> ids = {static_cast<std::int64_t>(10 + c.rank())};
      (void)emb.lookup(ids);
    } catch (const usage_error& e) {
      what = e.what();
    }
    std::string sharded;
    try {
      train::sharded_data_parallel sdp(c, net.parameters());
    } catch (const not_supported_error& e) {
      sharded = e.what();
    }
    std::lock_guard lock(m);
    messages[static_cast<std::size_t>(c.rank())] = what + " | " + sharded;
  });
  for (int r = 0; r < 2; ++r) {
    const auto& s = messages[static_cast<std::size_t>(r)];
    INFO(s);
    CHECK(s.find("id " + std::to_string(10 + r)) != std::string::npos);
    CHECK(s.find("10 rows") != std::string::npos);
    CHECK(s.find("on rank " + std::to_string(r)) != std::string::npos);
    CHECK(s.find("sparse row gradients") != std::string::npos);
  }
}

TEST_CASE("sparse_allreduce_bytes_sent: the Bruck gathers of the shapes and packed rows",
          "[train][embedding]") {
  const std::vector<std::size_t> rows = {3, 0, 5};
  // 3 ranks: each sends its own block in both rounds (3 indices and 3 x 4
  // floats = 9 words for rank 0), after 2 blocks of 5 shape words.
  CHECK(sparse_allreduce_bytes_sent(rows, 4, 4, 0) == 2 * 40 + 2 * 9 * 8);
  CHECK(sparse_allreduce_bytes_sent(rows, 4, 4, 1) == 2 * 40);
  CHECK(sparse_allreduce_bytes_sent(std::vector<std::size_t>{7}, 4, 4, 0) == 0);
}
