// Nonblocking collectives: same bits as blocking, several in flight, errors.
#include <atomic>
#include <cstring>
#include <mutex>

#include "ringflow/backends/local.hpp"
#include "ringflow/coll/async.hpp"
#include "support/catch.hpp"

using namespace ringflow;

TEST_CASE("async allreduce gives the blocking result bits, many in flight", "[coll][async]") {
  std::atomic<int> mismatches{0};
  for (int p : {1, 2, 3, 4}) {
    local::run(p, [&](communicator& c) {
      constexpr int buckets = 12;
      std::vector<std::vector<float>> a(buckets), b(buckets);
      for (int k = 0; k < buckets; ++k) {
        const std::size_t n = 1000 + 977 * static_cast<std::size_t>(k);
        a[k].resize(n);
        for (std::size_t i = 0; i < n; ++i) {
          a[k][i] = std::sin(static_cast<float>(i + 31 * k) * 0.1f + static_cast<float>(c.rank()));
        }
        b[k] = a[k];
      }
      std::vector<collective_handle> handles;
      for (int k = 0; k < buckets; ++k) handles.push_back(allreduce_async(c, std::span(a[k]), avg));
      // Blocking calls on the same communicator meanwhile do not interfere.
      for (int k = 0; k < buckets; ++k) allreduce(c, std::span(b[k]), avg);
      wait_all(handles);
      for (int k = 0; k < buckets; ++k) {
        if (std::memcmp(a[k].data(), b[k].data(), a[k].size() * sizeof(float)) != 0) ++mismatches;
      }
    });
  }
  CHECK(mismatches == 0);
}

TEST_CASE("async reduce_scatter, allgather and broadcast", "[coll][async]") {
  std::atomic<int> wrong{0};
  local::run(3, [&](communicator& c) {
    std::vector<int> in(10, c.rank() + 1), piece(partition(10, 3, c.rank()).count);
    auto h1 = reduce_scatter_async(c, std::span<const int>(in), std::span(piece), sum);
    std::vector<int> all(10), mine(partition(10, 3, c.rank()).count, c.rank());
    auto h2 = allgather_async(c, std::span<const int>(mine), std::span(all));
    std::vector<double> root_data(5, c.rank() == 2 ? 4.5 : 0.0);
    auto h3 = broadcast_async(c, std::span(root_data), 2);
    h1.wait();
    h2.wait();
    while (!h3.test()) {}
    for (int v : piece) wrong += v != 6;
    for (int q = 0; q < 3; ++q) {
      const chunk ch = partition(10, 3, q);
      for (std::size_t i = 0; i < ch.count; ++i) wrong += all[ch.offset + i] != q;
    }
    for (double v : root_data) wrong += v != 4.5;
  });
  CHECK(wrong == 0);
}

TEST_CASE("an async collective that fails reports it at wait()", "[coll][async]") {
  std::mutex m;
  std::vector<std::string> errors;
  try {
    local::run(2, [&](communicator& c) {
      c.set_checked(true);
      std::vector<float> g(c.rank() == 0 ? 8 : 9);
      auto h = allreduce_async(c, std::span(g), sum);
      try {
        h.wait();
      } catch (const usage_error& e) {
        std::lock_guard lock(m);
        errors.push_back(e.what());
        throw;
      }
    });
  } catch (const usage_error&) {}
  REQUIRE(errors.size() == 2);
  CHECK(errors[0].find("count=9") != std::string::npos);
}
