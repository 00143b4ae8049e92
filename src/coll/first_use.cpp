// First-use tuning for algo::automatic (see first_use.hpp).
#include "ringflow/coll/first_use.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <bit>
#include <cstdlib>
#include <limits>
#include <string_view>

#include "ringflow/coll/ring.hpp"
#include "ringflow/coll/tuning.hpp"
#include "ringflow/core/env.hpp"
#include "ringflow/core/error.hpp"
#include "ringflow/core/log.hpp"
#include "ringflow/core/reduce_op.hpp"

namespace ringflow::detail {

int first_use_class(std::size_t bytes) {
  return bytes <= 1 ? 0 : static_cast<int>(std::bit_width(bytes - 1));
}

int first_use_rounds(std::size_t bytes) {
  // Measured on the 2-core VM at -np 4: a 1-64 KiB call swings 2-3x from
  // one call to the next (a descheduled rank), so the median needs more
  // samples there; from 16 MiB a call takes 10-100 ms and is steady.
  if (bytes <= (256u << 10)) return 7;
  if (bytes <= (4u << 20)) return 4;
  return 3;
}

int first_use_block(std::size_t bytes) {
  // A sample is the mean of `block` consecutive calls: what a caller pays
  // is the mean time, and with ranks sharing cores single calls are
  // bimodal (a descheduled peer costs a time slice), so their median can
  // favour an algorithm whose mean is worse.
  if (bytes <= (256u << 10)) return 4;
  if (bytes <= (4u << 20)) return 2;
  return 1;
}

std::vector<algo> first_use_candidates(const cost_model& m, const cluster_shape& shape,
                                       std::size_t bytes) {
  const explanation e = choose_algorithm(m, shape, bytes);
  std::vector<algo> out;
  const double best = e.candidates.empty() ? 0 : e.candidates.front().seconds;
  for (const auto& c : e.candidates) {
    if (!automatic_candidate(c.algorithm, shape)) continue;
    if (c.seconds <= 4 * best || c.algorithm == algo::shm) out.push_back(c.algorithm);
  }
  if (out.empty()) out.push_back(algo::ring);
  return out;
}

first_use_tuner::class_state* first_use_tuner::find(int cls) {
  for (auto& [c, s] : classes_) {
    if (c == cls) return &s;
  }
  return nullptr;
}

const first_use_tuner::class_state* first_use_tuner::find(int cls) const {
  for (const auto& [c, s] : classes_) {
    if (c == cls) return &s;
  }
  return nullptr;
}

namespace {
double median_of(std::vector<double> v) {
  if (v.empty()) return std::numeric_limits<double>::infinity();
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}
}  // namespace

first_use_tuner::pick first_use_tuner::next(transport& t, std::size_t bytes, const cost_model& m,
                                            const cluster_shape& shape) {
  const int cls = first_use_class(bytes);
  if (const std::uint8_t v =
          settled_[static_cast<std::size_t>(cls)].load(std::memory_order_acquire)) {
    return {static_cast<algo>(v - 1), false, cls, 0};
  }
  std::lock_guard lock(mutex_);
  class_state* s = find(cls);
  if (s == nullptr) {
    class_state fresh;
    fresh.candidates = first_use_candidates(m, shape, bytes);
    fresh.seconds.resize(fresh.candidates.size());
    fresh.rounds = first_use_rounds(bytes);
    fresh.block = first_use_block(bytes);
    classes_.emplace_back(cls, std::move(fresh));
    s = &classes_.back().second;
  }
  if (s->done) return {s->done->choice, false, cls, 0};
  const int n = static_cast<int>(s->candidates.size());
  const int span = s->block + 1;  // one untimed call, then the timed block
  const int per_round = n * span;
  const int trials = per_round * s->rounds;
  if (s->calls < trials) {
    // Round r visits the candidates starting at r (mod n), so a burst of
    // load from elsewhere does not always land on the same one. Each visit
    // is one untimed call (the candidate's buffers and caches warm again
    // after the others ran) and `block` timed ones, averaged into a sample.
    const int round = s->calls / per_round;
    const int in_round = s->calls % per_round;
    const int slot = (in_round / span + round) % n;
    const int q = in_round % span;
    ++s->calls;
    return {s->candidates[static_cast<std::size_t>(slot)], q > 0, cls, slot, q == s->block};
  }
  // Every rank arrives here at the same call: agree on the medians.
  std::vector<double> med(static_cast<std::size_t>(n));
  for (int i = 0; i < n; ++i)
    med[static_cast<std::size_t>(i)] = median_of(s->seconds[static_cast<std::size_t>(i)]);
  if (t.size() > 1)
    ring_allreduce(t, med.data(), med.data(), med.size(), max, default_segment_bytes);
  first_use_choice c;
  c.rounds = s->rounds;
  c.block = s->block;
  c.calls = s->calls + 1;
  for (int i = 0; i < n; ++i) {
    const algo a = s->candidates[static_cast<std::size_t>(i)];
    if (a == algo::shm && !shape.shm) continue;
    c.medians.push_back({a, med[static_cast<std::size_t>(i)]});
  }
  if (c.medians.empty()) c.medians.push_back({algo::ring, std::numeric_limits<double>::infinity()});
  // Stable: on a tie the model's earlier (preferred) candidate wins.
  std::stable_sort(
      c.medians.begin(), c.medians.end(),
      [](const algo_prediction& x, const algo_prediction& y) { return x.seconds < y.seconds; });
  c.choice = c.medians.front().algorithm;
  // The model's pick stays unless another candidate measured clearly faster:
  // three samples of a 64 MiB call on shared cores can put a slower
  // algorithm ahead by a few percent (one run of five picked
  // halving_doubling at -np 4, 1.28x slower than shm). Keeping a pick that
  // really is up to first_use_margin slower costs at most that much.
  const algo model_pick = s->candidates.front();
  const auto kept =
      std::find_if(c.medians.begin() + 1, c.medians.end(),
                   [&](const algo_prediction& p) { return p.algorithm == model_pick; });
  if (kept != c.medians.end() &&
      kept->seconds <= c.medians.front().seconds * (1 + first_use_margin)) {
    std::rotate(c.medians.begin(), kept, kept + 1);  // the pick first, the rest in order
    c.choice = model_pick;
    c.kept_model_pick = true;
  }
  if (t.rank() == 0 && log::current_level() >= log::level::info) {
    std::string all;
    for (const auto& m : c.medians) {
      all += fmt::format("{}{} {:.1f} us", all.empty() ? "" : ", ", algo_name(m.algorithm),
                         m.seconds * 1e6);
    }
    log::info("first-use tuning, allreduces of over {} B up to {} B on {} ranks: {} ({} calls)",
              cls == 0 ? 0 : std::size_t{1} << (cls - 1), std::size_t{1} << cls, t.size(), all,
              c.calls);
  }
  s->done = std::move(c);
  s->seconds.clear();
  settled_[static_cast<std::size_t>(cls)].store(
      static_cast<std::uint8_t>(static_cast<int>(s->done->choice) + 1), std::memory_order_release);
  return {s->done->choice, false, cls, 0};
}

void first_use_tuner::record(const pick& p, double seconds) {
  std::lock_guard lock(mutex_);
  class_state* s = find(p.cls);
  if (s == nullptr || s->done || p.slot < 0 ||
      static_cast<std::size_t>(p.slot) >= s->seconds.size()) {
    return;
  }
  s->block_seconds += seconds;
  if (p.last_of_block) {
    s->seconds[static_cast<std::size_t>(p.slot)].push_back(s->block_seconds / s->block);
    s->block_seconds = 0;
  }
}

std::optional<first_use_choice> first_use_tuner::settled(std::size_t bytes) const {
  std::lock_guard lock(mutex_);
  const class_state* s = find(first_use_class(bytes));
  if (s == nullptr) return std::nullopt;
  return s->done;
}

int first_use_tuner::calls_left(std::size_t bytes) const {
  std::lock_guard lock(mutex_);
  const class_state* s = find(first_use_class(bytes));
  if (s == nullptr) return -1;
  if (s->done) return 0;
  const int n = static_cast<int>(s->candidates.size());
  return n * (s->block + 1) * s->rounds - s->calls + 1;
}

bool first_use_enabled_by_env() {
  return env::flag("RINGFLOW_AUTOTUNE", true, env::malformed::fail);
}

}  // namespace ringflow::detail
