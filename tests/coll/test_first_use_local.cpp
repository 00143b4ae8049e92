// First-use tuning: where no tuning table covers a size, automatic times its
// candidates on the first allreduces of each size class, agrees on the
// fastest (the slowest rank's median) and keeps it; results stay right
// during the trials; RINGFLOW_AUTOTUNE turns it off, and a malformed value is
// an error on every rank.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "ringflow/backends/local.hpp"
#include "ringflow/backends/shm.hpp"
#include "ringflow/coll/collectives.hpp"
#include "ringflow/coll/context.hpp"
#include "ringflow/coll/cost_model.hpp"
#include "ringflow/coll/explain.hpp"
#include "ringflow/coll/first_use.hpp"
#include "support/catch.hpp"
#include "support/coll_checks.hpp"
#include "support/collect.hpp"

using namespace ringflow;
using ringflow::testing::failures;
using ringflow::testing::require_none;
using ringflow::testing::run_collecting;
using ringflow::testing::scoped_env;

namespace {
bool near(double x, double y) { return std::abs(x - y) <= 1e-9 * std::abs(y); }

bool contains(const std::string& s, const std::string& part) {
  return s.find(part) != std::string::npos;
}
}  // namespace

TEST_CASE("first-use size classes, rounds and candidates", "[coll][first_use]") {
  CHECK(detail::first_use_class(1) == 0);
  CHECK(detail::first_use_class(1024) == 10);
  CHECK(detail::first_use_class(1025) == 11);
  CHECK(detail::first_use_class(2048) == 11);
  CHECK(detail::first_use_class(std::size_t{64} << 20) == 26);
  // Fewer, larger samples as calls get longer.
  CHECK(detail::first_use_rounds(1024) >= detail::first_use_rounds(std::size_t{64} << 20));
  CHECK(detail::first_use_block(1024) >= detail::first_use_block(std::size_t{64} << 20));
  const cost_model m = builtin_cost_model();
  const cluster_shape four{4, 1, 4, 2, false};
  for (std::size_t b = 1024; b <= (std::size_t{64} << 20); b *= 4) {
    const auto c = detail::first_use_candidates(m, four, b);
    REQUIRE_FALSE(c.empty());
    CHECK(c.front() == choose_algorithm(m, four, b).choice);  // the model's order
    for (algo a : c) CHECK(automatic_candidate(a, four));     // never shm without shm
  }
  // shm is always tried where it can run, even where the model doubts it
  // (registered by the MPI backend's first communicator; none here).
  REQUIRE(detail::shm_register());
  cluster_shape with_shm = four;
  with_shm.shm = true;
  for (std::size_t b = 1024; b <= (std::size_t{64} << 20); b *= 4) {
    const auto c = detail::first_use_candidates(m, with_shm, b);
    CHECK(std::find(c.begin(), c.end(), algo::shm) != c.end());
  }
}

TEST_CASE("first-use tuning agrees on the slowest rank's median and ignores a burst",
          "[coll][first_use]") {
  const cost_model m = builtin_cost_model();
  const cluster_shape shape{3, 1, 3, 0, false};
  const std::size_t bytes = 4096;
  const auto cand = detail::first_use_candidates(m, shape, bytes);
  REQUIRE(cand.size() >= 2);
  const algo fast_but_not_everywhere = cand.front();
  const algo winner = cand.back();
  const int expected_calls = static_cast<int>(cand.size()) * (detail::first_use_block(bytes) + 1) *
                                 detail::first_use_rounds(bytes) +
                             1;
  require_none(run_collecting(3, [&](communicator& c, failures& fl) {
    detail::first_use_tuner tuner;
    if (tuner.calls_left(bytes) != -1) fl.push_back("an unseen class has calls left");
    int calls = 0, winner_records = 0;
    while (calls < 10000) {
      const auto p = tuner.next(c.raw(), bytes, m, shape);
      ++calls;
      if (!p.timed) {
        if (tuner.settled(bytes)) break;
        continue;  // a visit's untimed first call
      }
      // The model's favourite is fastest on ranks 0 and 2 but slow on rank 1:
      // the slowest rank decides. The winner has one burst of 100x.
      double us = 20;
      if (p.algorithm == fast_but_not_everywhere) us = c.rank() == 1 ? 100 : 1;
      if (p.algorithm == winner) us = (winner_records++ == 0) ? 1000 : 10;
      tuner.record(p, us * 1e-6);
    }
    const auto done = tuner.settled(bytes);
    if (!done) {
      fl.push_back(fmt::format("rank {}: not settled after {} calls", c.rank(), calls));
      return;
    }
    if (calls != expected_calls) {
      fl.push_back(fmt::format("rank {}: settled after {} calls, expected {}", c.rank(), calls,
                               expected_calls));
    }
    if (done->choice != winner) {
      fl.push_back(fmt::format("rank {}: chose {}, expected {}", c.rank(), algo_name(done->choice),
                               algo_name(winner)));
    }
    if (done->medians.size() != cand.size() || !near(done->medians.front().seconds, 10e-6)) {
      fl.push_back(fmt::format("rank {}: {} medians, fastest {} s", c.rank(), done->medians.size(),
                               done->medians.empty() ? 0.0 : done->medians.front().seconds));
    }
    for (const auto& mp : done->medians) {
      if (mp.algorithm == fast_but_not_everywhere && !near(mp.seconds, 100e-6)) {
        fl.push_back(fmt::format("rank {}: agreed median of {} is {} s, not rank 1's 100 us",
                                 c.rank(), algo_name(mp.algorithm), mp.seconds));
      }
    }
    if (tuner.calls_left(bytes) != 0) fl.push_back("settled but calls left");
    // Settled: every later call of the class runs the winner, untimed.
    const auto later = tuner.next(c.raw(), bytes - 100, m, shape);
    if (later.timed || later.algorithm != winner) fl.push_back("a later call is not the winner");
    // Another class starts its own trials.
    if (!tuner.next(c.raw(), 1 << 20, m, shape).timed && tuner.calls_left(1 << 20) < 0) {
      fl.push_back("a new class was not started");
    }
  }));
}

TEST_CASE("first-use tuning keeps the model's pick within the margin, not beyond it",
          "[coll][first_use]") {
  const cost_model m = builtin_cost_model();
  const cluster_shape shape{2, 1, 2, 0, false};
  const std::size_t bytes = std::size_t{64} << 20;
  const auto cand = detail::first_use_candidates(m, shape, bytes);
  REQUIRE(cand.size() >= 2);
  const algo model_pick = cand.front();
  const algo other = cand[1];
  // Every rank measures model_pick at `ratio` times `other`, the rest 10x.
  auto settle = [&](double ratio, failures& fl, communicator& c) {
    detail::first_use_tuner tuner;
    for (int calls = 0; calls < 10000 && !tuner.settled(bytes); ++calls) {
      const auto p = tuner.next(c.raw(), bytes, m, shape);
      if (!p.timed) continue;
      double s = 10.0;
      if (p.algorithm == other) s = 1.0;
      if (p.algorithm == model_pick) s = ratio;
      tuner.record(p, s * 1e-3);
    }
    const auto done = tuner.settled(bytes);
    if (!done) fl.push_back(fmt::format("rank {}: not settled", c.rank()));
    return done;
  };
  require_none(run_collecting(2, [&](communicator& c, failures& fl) {
    const auto near_tie = settle(1.03, fl, c);  // within 5%: noise, the model stays
    if (near_tie) {
      if (near_tie->choice != model_pick || !near_tie->kept_model_pick ||
          near_tie->medians.front().algorithm != model_pick) {
        fl.push_back(fmt::format("rank {}: 3% slower {} was not kept (chose {})", c.rank(),
                                 algo_name(model_pick), algo_name(near_tie->choice)));
      }
    }
    const auto clear = settle(1.20, fl, c);  // 20% slower: measured, replaced
    if (clear && (clear->choice != other || clear->kept_model_pick)) {
      fl.push_back(fmt::format("rank {}: 20% slower {} was kept over {}", c.rank(),
                               algo_name(model_pick), algo_name(other)));
    }
  }));
}

TEST_CASE("automatic allreduces are right during and after first-use tuning", "[coll][first_use]") {
  scoped_env tuning("RINGFLOW_TUNING", "off");
  scoped_env autotune("RINGFLOW_AUTOTUNE", nullptr);
  for (int p : {2, 4}) {
    require_none(run_collecting(p, [&](communicator& c, failures& fl) {
      const std::size_t n = 1024;  // 4 KiB of int32
      std::vector<std::int32_t> v(n);
      int calls = 0;
      for (int i = 0; i < 400; ++i) {
        for (std::size_t k = 0; k < n; ++k) v[k] = static_cast<std::int32_t>(c.rank() + i + k);
        allreduce(c, std::span<std::int32_t>(v), sum);
        ++calls;
        const std::int64_t ranks = c.size();
        for (std::size_t k = 0; k < n; ++k) {
          const std::int64_t want =
              ranks * (ranks - 1) / 2 + ranks * (i + static_cast<std::int64_t>(k));
          if (v[k] != want) {
            fl.push_back(fmt::format("rank {} call {}: element {} is {}, expected {}", c.rank(), i,
                                     k, v[k], want));
            return;
          }
        }
        if (detail::automatic_calls_left(c, n * sizeof(std::int32_t)) == 0) break;
      }
      const explanation e = explain(c, n * sizeof(std::int32_t));
      if (!e.from_first_use || e.candidates.empty() || !contains(e.to_string(), "first-use")) {
        fl.push_back(fmt::format("rank {} after {} calls: {}", c.rank(), calls, e.to_string()));
      }
      // Settled: identical calls give identical bits again (the trials
      // before may not: they run different algorithms).
      {
        std::vector<float> a(n), b(n);  // 4 KiB: the settled class
        for (std::size_t k = 0; k < n; ++k) a[k] = 1.0f / static_cast<float>(3 + k + 7 * c.rank());
        b = a;
        allreduce(c, std::span<float>(a), sum);
        allreduce(c, std::span<float>(b), sum);
        if (a != b) fl.push_back(fmt::format("rank {}: settled auto gave other bits", c.rank()));
      }
      // Every rank settled on the same algorithm.
      std::int32_t mine[2] = {static_cast<std::int32_t>(e.choice),
                              -static_cast<std::int32_t>(e.choice)};
      allreduce(c, std::span<std::int32_t>(mine), max, coll_options{algo::ring});
      if (mine[0] != -mine[1])
        fl.push_back(fmt::format("rank {}: ranks chose differently", c.rank()));
      // A size not seen yet: the model's choice, and a note saying what comes.
      const explanation big = explain(c, 1 << 20);
      if (big.from_first_use || !contains(big.first_use_note, "first-use tuning")) {
        fl.push_back(fmt::format("rank {}: unseen size: {}", c.rank(), big.to_string()));
      }
    }));
  }
}

TEST_CASE("RINGFLOW_AUTOTUNE=off keeps the model; a malformed value fails on every rank",
          "[coll][first_use]") {
  scoped_env tuning("RINGFLOW_TUNING", "off");
  {
    scoped_env autotune("RINGFLOW_AUTOTUNE", "off");
    require_none(run_collecting(3, [&](communicator& c, failures& fl) {
      std::vector<float> v(1024, 1.0f);
      for (int i = 0; i < 50; ++i) allreduce(c, std::span<float>(v), sum);
      if (detail::automatic_calls_left(c, 4096) != 0) fl.push_back("calls left with it off");
      const explanation e = explain(c, 4096);
      if (e.from_first_use || !e.first_use_note.empty()) fl.push_back(e.to_string());
    }));
  }
  {
    scoped_env autotune("RINGFLOW_AUTOTUNE", "sometimes");
    std::atomic<int> refused{0};
    require_none(run_collecting(3, [&](communicator& c, failures& fl) {
      std::vector<float> v(1024, 1.0f);
      try {
        allreduce(c, std::span<float>(v), sum);
        fl.push_back(fmt::format("rank {}: a malformed RINGFLOW_AUTOTUNE was accepted", c.rank()));
      } catch (const usage_error& e) {
        if (!contains(e.what(), "RINGFLOW_AUTOTUNE") || !contains(e.what(), "sometimes") ||
            !contains(e.what(), fmt::format("rank {}", c.rank()))) {
          fl.push_back(fmt::format("rank {}: unclear error: {}", c.rank(), e.what()));
        }
        ++refused;
      }
    }));
    CHECK(refused == 3);
  }
}
