// Tests of batch assembly and the prefetcher: contents, equality with sequential, errors, shutdown.
#include <numeric>
#include <vector>

#include "ringflow/core/error.hpp"
#include "ringflow/data/batch.hpp"
#include "ringflow/data/sampler.hpp"
#include "support/catch.hpp"

using namespace ringflow::data;

namespace {

// n samples of `features` floats; sample i holds i*1000 + j, label i % 10.
dataset make_dataset(std::size_t n, std::size_t features) {
  dataset ds;
  ds.rows = 1;
  ds.cols = static_cast<int>(features);
  ds.num_classes = 10;
  ds.images.resize(static_cast<Eigen::Index>(n), static_cast<Eigen::Index>(features));
  ds.labels.resize(n);
  for (std::size_t i = 0; i < n; ++i) {
    for (std::size_t j = 0; j < features; ++j) {
      ds.images(static_cast<Eigen::Index>(i), static_cast<Eigen::Index>(j)) =
          static_cast<float>(i * 1000 + j);
    }
    ds.labels[i] = static_cast<std::int32_t>(i % 10);
  }
  return ds;
}

std::vector<batch> drain(prefetcher& p) {
  std::vector<batch> out;
  batch b;
  while (p.next(b)) out.push_back(b);
  return out;
}

}  // namespace

TEST_CASE("assemble_batch copies the chosen rows contiguously", "[data][batch]") {
  const auto ds = make_dataset(20, 5);
  const std::vector<std::size_t> idx = {3, 17, 0};
  const batch b = assemble_batch(ds, idx);
  REQUIRE(b.size() == 3);
  REQUIRE(b.images.rows() == 3);
  REQUIRE(b.images.cols() == 5);
  for (std::size_t r = 0; r < 3; ++r) {
    CHECK(b.labels[r] == static_cast<std::int32_t>(idx[r] % 10));
    for (std::size_t j = 0; j < 5; ++j) {
      // Row-major and contiguous: element (r, j) sits at data()[r * 5 + j].
      CHECK(b.images.data()[r * 5 + j] == static_cast<float>(idx[r] * 1000 + j));
    }
  }
  const std::vector<std::size_t> bad = {1, 20};
  CHECK_THROWS_AS(assemble_batch(ds, bad), ringflow::usage_error);
}

TEST_CASE("batch_count rounds up unless drop_last", "[data][batch]") {
  CHECK(batch_count(10, 3) == 4);
  CHECK(batch_count(10, 3, true) == 3);
  CHECK(batch_count(9, 3) == 3);
  CHECK(batch_count(0, 3) == 0);
  CHECK_THROWS_AS(batch_count(10, 0), ringflow::usage_error);
}

TEST_CASE("prefetched batches equal sequential ones", "[data][batch][prefetch]") {
  const auto ds = make_dataset(1000, 16);
  sampler s(ds.size(), 1, 3, 77);
  s.set_epoch(2);
  for (bool drop_last : {false, true}) {
    for (std::size_t bs : {1u, 7u, 32u, 333u, 400u}) {
      INFO("batch=" << bs << " drop_last=" << drop_last);
      prefetcher seq(ds, s.indices(), bs, {.depth = 0, .drop_last = drop_last});
      const auto expected = drain(seq);
      REQUIRE(expected.size() == batch_count(s.indices().size(), bs, drop_last));
      // The plain definition: consecutive slices of the indices.
      for (std::size_t k = 0; k < expected.size(); ++k) {
        const auto begin = k * bs;
        const auto len = std::min(bs, s.indices().size() - begin);
        const auto ref = assemble_batch(ds, std::span(s.indices()).subspan(begin, len));
        REQUIRE(expected[k].images == ref.images);
        REQUIRE(expected[k].labels == ref.labels);
      }
      for (std::size_t depth : {1u, 2u, 5u}) {
        prefetcher pf(ds, s.indices(), bs, {.depth = depth, .drop_last = drop_last});
        CHECK(pf.size() == expected.size());
        const auto got = drain(pf);
        REQUIRE(got.size() == expected.size());
        for (std::size_t k = 0; k < got.size(); ++k) {
          REQUIRE(got[k].images == expected[k].images);
          REQUIRE(got[k].labels == expected[k].labels);
        }
      }
    }
  }
}

TEST_CASE("a prefetcher reusing one batch object keeps giving correct data",
          "[data][batch][prefetch]") {
  const auto ds = make_dataset(100, 4);
  std::vector<std::size_t> idx(100);
  std::iota(idx.begin(), idx.end(), std::size_t{0});
  prefetcher pf(ds, idx, 8, {.depth = 3});
  batch b;
  std::size_t next_sample = 0;
  while (pf.next(b)) {
    for (std::size_t r = 0; r < b.size(); ++r, ++next_sample) {
      REQUIRE(b.images(static_cast<Eigen::Index>(r), 0) == static_cast<float>(next_sample * 1000));
    }
  }
  CHECK(next_sample == 100);
  CHECK_FALSE(pf.next(b));  // stays at the end
}

TEST_CASE("a worker error reaches the consumer after the good batches", "[data][batch][prefetch]") {
  const auto ds = make_dataset(10, 2);
  const std::vector<std::size_t> idx = {0, 1, 2, 3, 99, 5};  // batch 2 holds a bad index
  for (std::size_t depth : {0u, 1u, 4u}) {
    INFO("depth=" << depth);
    prefetcher pf(ds, idx, 2, {.depth = depth});
    batch b;
    CHECK(pf.next(b));
    CHECK(pf.next(b));
    CHECK_THROWS_AS(pf.next(b), ringflow::usage_error);
  }
}

TEST_CASE("destroying a prefetcher early does not hang", "[data][batch][prefetch]") {
  const auto ds = make_dataset(1000, 8);
  std::vector<std::size_t> idx(1000);
  std::iota(idx.begin(), idx.end(), std::size_t{0});
  for (int round = 0; round < 50; ++round) {
    prefetcher pf(ds, idx, 10, {.depth = 2});
    batch b;
    for (int k = 0; k < round % 4; ++k) REQUIRE(pf.next(b));
  }  // each destructor stops a worker blocked on a full queue
  prefetcher empty(ds, std::span<const std::size_t>(), 10);
  batch b;
  CHECK_FALSE(empty.next(b));
  CHECK(empty.size() == 0);
}
