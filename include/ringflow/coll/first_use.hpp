// First-use tuning for algo::automatic: where no tuning table covers a size,
// the first allreduces of each size class try the plausible algorithms in
// turn (round-robin; each visit one untimed call, then a block of timed
// ones), time them on every rank, agree on the fastest with one small
// allreduce (the maximum over ranks of each algorithm's median block mean),
// and keep that choice for the communicator's life.
// The trials are the caller's own allreduces, so they cost only the
// difference between a slower algorithm and the best one, once per size
// class (docs/collectives.md, "First-use tuning").
//
// Every decision is a pure function of the sequence of allreduce sizes and
// of the agreed medians, so all ranks pick the same algorithm for the same
// call without talking, except once per size class.
#pragma once

#include <array>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "ringflow/coll/cost_model.hpp"
#include "ringflow/coll/options.hpp"

namespace ringflow {
class transport;
}

namespace ringflow::detail {

/// The size class of an allreduce of `bytes` (> 0): bytes rounded up to a
/// power of two, as its exponent (1 KiB: 10; 1025 B to 2 KiB: 11).
int first_use_class(std::size_t bytes);

/// Rounds per candidate for an allreduce of `bytes`: more where calls are
/// cheap and noisy, fewer where one call takes milliseconds.
int first_use_rounds(std::size_t bytes);

/// Timed calls per candidate and round for `bytes` (after one untimed call),
/// averaged into one sample.
int first_use_block(std::size_t bytes);

/// The candidates first-use tuning tries for `bytes` on `shape`: the model's
/// prediction within a factor 4 of its best (the model misjudges by up to
/// ~2x on an oversubscribed node, never by 4x), plus shm whenever it can run
/// (the model is conservative about it), in the model's order.
std::vector<algo> first_use_candidates(const cost_model& m, const cluster_shape& shape,
                                       std::size_t bytes);

/// What first-use tuning settled for one size class.
struct first_use_choice {
  algo choice = algo::ring;
  std::vector<algo_prediction> medians;  ///< agreed medians (max over ranks), fastest first
  int rounds = 0;                        ///< rounds per candidate behind each median
  int block = 1;                         ///< calls averaged into each round's sample
  int calls = 0;                         ///< allreduces it took, the untimed round included
  /// The model's pick measured within first_use_margin of the fastest and
  /// was kept (it is then medians.front(), ahead of a faster median).
  bool kept_model_pick = false;
};

/// How much faster (as a fraction) another candidate must measure than the
/// cost model's pick to replace it.
inline constexpr double first_use_margin = 0.05;

class first_use_tuner {
 public:
  /// One allreduce's algorithm; when `timed`, the caller times the call and
  /// hands the seconds to record().
  struct pick {
    algo algorithm = algo::ring;
    bool timed = false;
    int cls = 0;
    int slot = 0;                ///< the candidate's index in its class
    bool last_of_block = false;  ///< the block's last call: its sample is complete
  };

  /// The algorithm for the next allreduce of `bytes`. The first time a
  /// class is seen its candidates come from first_use_candidates(m, shape,
  /// bytes). When the class's trials are complete, this call first agrees on
  /// the winner with one allreduce of a few doubles on `t` (collective: every
  /// rank reaches it at the same call), leaving out shm when shape.shm is
  /// false by then (it declined meanwhile).
  pick next(transport& t, std::size_t bytes, const cost_model& m, const cluster_shape& shape);

  /// The seconds one timed call of `p` took on this rank.
  void record(const pick& p, double seconds);

  /// The settled choice of `bytes`'s class, or nullopt while it is still
  /// being measured (or not yet seen).
  std::optional<first_use_choice> settled(std::size_t bytes) const;

  /// Allreduces of `bytes`'s class still to come before it is settled (the
  /// agreeing call included), or -1 when the class has not been seen.
  int calls_left(std::size_t bytes) const;

 private:
  struct class_state {
    std::vector<algo> candidates;
    std::vector<std::vector<double>> seconds;  // per candidate, timed rounds
    int rounds = 0;
    int block = 1;
    int calls = 0;             // picks handed out
    double block_seconds = 0;  // the current block's calls so far
    std::optional<first_use_choice> done;
  };
  class_state* find(int cls);
  const class_state* find(int cls) const;

  mutable std::mutex mutex_;
  std::vector<std::pair<int, class_state>> classes_;  // few classes: a flat list
  // Per class, the settled algorithm + 1 (0: not settled): once a class is
  // settled, next() is one atomic load, without the lock.
  std::array<std::atomic<std::uint8_t>, 65> settled_{};
};

/// Whether first-use tuning is on: RINGFLOW_AUTOTUNE unset, 1, on, true or
/// yes (the default); 0, off, false or no turn it off (automatic then uses
/// the cost model where no table covers a size). Anything else is a
/// usage_error naming the value. Read on rank 0 and sent to the others with
/// the communicator's context, so all ranks agree.
bool first_use_enabled_by_env();

}  // namespace ringflow::detail
