// The flight recorder on the thread backend: what each record holds (kind,
// dtype, op, count, root, algorithm, state, times, the peer and tag waited
// on), the ring's wrap-around, failed collectives, and the dump's lines.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "ringflow/backends/local.hpp"
#include "ringflow/coll/async.hpp"
#include "ringflow/coll/collectives.hpp"
#include "ringflow/comm/flight.hpp"
#include "support/catch.hpp"

using namespace ringflow;

TEST_CASE("flight records hold each collective's fields", "[comm][flight]") {
  REQUIRE(flight::enabled());
  std::mutex m;
  std::vector<std::vector<flight::entry>> seen(3);
  local::run(3, [&](communicator& c) {
    std::vector<float> g(1000, 1.0f);
    allreduce(c, std::span(g), sum, algo::ring);
    std::vector<double> d(64, 2.0);
    allreduce(c, std::span(d), max, algo::recursive_doubling);
    std::vector<std::int32_t> b(10, c.rank());
    broadcast(c, std::span(b), /*root=*/2);
    barrier(c);
    std::lock_guard lock(m);
    seen[static_cast<std::size_t>(c.rank())] = flight::recent(c.raw());
  });
  for (const auto& rec : seen) {
    REQUIRE(rec.size() == 4);
    CHECK(rec[0].sequence == 0);
    CHECK(rec[0].kind == coll_kind::allreduce);
    CHECK(rec[0].type == dtype::f32);
    CHECK(rec[0].op == op_kind::sum);
    CHECK(rec[0].count == 1000);
    CHECK(rec[0].algorithm == "ring");
    CHECK(rec[1].sequence == 1);
    CHECK(rec[1].type == dtype::f64);
    CHECK(rec[1].op == op_kind::max);
    CHECK(rec[1].algorithm == "recursive_doubling");
    CHECK(rec[2].kind == coll_kind::broadcast);
    CHECK(rec[2].root == 2);
    CHECK(rec[2].type == dtype::i32);
    CHECK(rec[3].kind == coll_kind::barrier);
    for (const auto& e : rec) {
      CHECK(e.st == flight::state::done);
      CHECK(e.start_ns > 0);
      CHECK(e.end_ns >= e.start_ns);
    }
  }
}

TEST_CASE("flight records name the peer and tag a blocked wait is on", "[comm][flight]") {
  std::vector<flight::entry> rank0;
  local::run(2, [&](communicator& c) {
    std::vector<float> g(16, 1.0f);
    if (c.rank() == 1) std::this_thread::sleep_for(std::chrono::milliseconds(100));
    allreduce(c, std::span(g), sum, algo::ring);
    if (c.rank() == 0) rank0 = flight::recent(c.raw());
  });
  REQUIRE(rank0.size() == 1);
  CHECK(rank0[0].wait_peer == 1);
  CHECK(rank0[0].wait_tag > collective_tag_base);
  CHECK(rank0[0].wait_since_ns >= rank0[0].start_ns);
  // Rank 0 waited for the sleeping rank 1, so its collective took that long.
  CHECK(rank0[0].end_ns - rank0[0].start_ns > 50'000'000);
}

TEST_CASE("the flight ring keeps the last ring_size() collectives", "[comm][flight]") {
  const std::size_t n = flight::ring_size();
  std::vector<flight::entry> rec;
  local::run(2, [&](communicator& c) {
    int v = 1;
    for (std::size_t i = 0; i < n + 10; ++i) {
      v = 1;  // summed in place over 2 ranks: it would double each time and overflow (UBSan)
      allreduce(c, std::span<int>(&v, 1), sum);
    }
    if (c.rank() == 1) rec = flight::recent(c.raw());
  });
  REQUIRE(rec.size() == n);
  CHECK(rec.front().sequence == 10);
  CHECK(rec.back().sequence == n + 9);
}

TEST_CASE("a failed collective is recorded as failed", "[comm][flight]") {
  std::mutex m;
  std::vector<std::vector<flight::entry>> seen(2);
  try {
    local::run(2, [&](communicator& c) {
      try {
        std::vector<float> g(c.rank() == 1 ? 99 : 100, 1.0f);
        allreduce(c, std::span(g), sum, algo::ring);
      } catch (...) {
        std::lock_guard lock(m);
        seen[static_cast<std::size_t>(c.rank())] = flight::recent(c.raw());
        throw;
      }
    });
  } catch (const error&) {}
  for (const auto& rec : seen) {
    REQUIRE(rec.size() == 1);
    CHECK(rec[0].st == flight::state::failed);
    CHECK(rec[0].end_ns >= rec[0].start_ns);
  }
}

TEST_CASE("async collectives are recorded on the engine's communicator", "[comm][flight]") {
  const std::string path = "flight_async_test.jsonl";
  std::atomic<int> own_records{0};
  local::run(2, [&](communicator& c) {
    std::vector<float> g(777, 1.0f);
    auto h = allreduce_async(c, std::span(g), sum);
    h.wait();
    // The caller's own communicator ran no collective (the engine's private
    // duplicate did), so its ring is empty. (No CHECK here: Catch is not
    // thread-safe.)
    own_records += static_cast<int>(flight::recent(c.raw()).size());
    barrier(c);  // both ranks finished their async work before the dump
    if (c.rank() == 0) flight::dump_to(path, "async");
  });
  CHECK(own_records == 0);
  std::ifstream in(path);
  std::string line;
  int found = 0;
  while (std::getline(in, line)) {
    if (line.find(R"("kind":"allreduce","dtype":"float","op":"sum","count":777,)") !=
            std::string::npos &&
        line.find(R"("state":"done")") != std::string::npos) {
      ++found;
    }
  }
  CHECK(found == 2);  // one per rank, on the engine's communicator
  std::remove(path.c_str());
}

TEST_CASE("a dump has a header, a line per communicator and per record", "[comm][flight]") {
  const std::string path = "flight_dump_test.jsonl";
  local::run(2, [&](communicator& c) {
    std::vector<float> g(8, 1.0f);
    allreduce(c, std::span(g), sum);
    allreduce(c, std::span(g), sum);
    barrier(c);
    if (c.rank() == 0) flight::dump_to(path, "unit \"test\"");
  });
  std::ifstream in(path);
  REQUIRE(in);
  std::string line;
  REQUIRE(std::getline(in, line));
  CHECK(line.find(R"("type":"header")") != std::string::npos);
  CHECK(line.find(R"("format":"ringflow-flight")") != std::string::npos);
  CHECK(line.find(R"("reason":"unit \"test\"")") != std::string::npos);
  int comms = 0, records = 0;
  while (std::getline(in, line)) {
    if (line.find(R"("type":"comm")") != std::string::npos) ++comms;
    if (line.find(R"("type":"record")") != std::string::npos) ++records;
  }
  // This group's two ranks (and possibly rings of earlier tests' groups).
  CHECK(comms >= 2);
  CHECK(records >= 6);
  std::remove(path.c_str());
}

TEST_CASE("dumps may run while collectives are recorded", "[comm][flight]") {
  // The dumper reads the rings while the ranks write them (ThreadSanitizer
  // checks this test in CI); every record it sees is whole.
  const std::string path = "flight_concurrent_test.jsonl";
  std::atomic<bool> done{false};
  std::atomic<int> dumps{0};
  std::thread dumper([&] {
    while (!done.load()) {
      flight::dump_to(path, "concurrent");
      ++dumps;
    }
  });
  local::run(2, [&](communicator& c) {
    std::vector<std::int64_t> v(4, 1);
    for (int i = 0; i < 3000; ++i) {
      std::fill(v.begin(), v.end(), 1);  // in place it would double each time and overflow
      allreduce(c, std::span(v), sum);
    }
  });
  done.store(true);
  dumper.join();
  CHECK(dumps.load() > 0);
  std::ifstream in(path);
  std::string line;
  REQUIRE(std::getline(in, line));
  CHECK(line.find(R"("type":"header")") != std::string::npos);
  while (std::getline(in, line)) {
    CHECK(line.front() == '{');
    CHECK(line.back() == '}');
  }
  std::remove(path.c_str());
}
