// Rank-sharded, seeded, per-epoch shuffling sampler for data-parallel training.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

namespace ringflow::data {

/// What a checkpoint needs to resume a sampler mid-epoch. `position` counts
/// the indices of this rank already consumed in `epoch`.
struct sampler_state {
  std::uint64_t seed = 0;
  std::uint64_t epoch = 0;
  std::uint64_t position = 0;

  friend bool operator==(const sampler_state&, const sampler_state&) = default;
};

/// Uniform integer in [0, bound) from a 64-bit engine by rejection (no
/// modulo bias), identical with every standard library, unlike
/// std::uniform_int_distribution. `bound` must be > 0.
template <class Engine>
std::uint64_t bounded_draw(Engine& engine, std::uint64_t bound) {
  // Values below `threshold` would make some residues one draw more likely.
  const std::uint64_t threshold = (0 - bound) % bound;
  for (;;) {
    const std::uint64_t r = static_cast<std::uint64_t>(engine());
    if (r >= threshold) return r % bound;
  }
}

/// The permutation of [0, n) used for `epoch`: Fisher-Yates driven by
/// std::mt19937_64 seeded from (seed, epoch) through splitmix64, with
/// bounded_draw. Identical on every rank, machine and compiler.
std::vector<std::size_t> epoch_permutation(std::size_t n, std::uint64_t seed, std::uint64_t epoch);

/// Splits a dataset of N samples across `world_size` ranks, reshuffled each
/// epoch. Every rank builds the same permutation of [0, N) for the epoch,
/// keeps its first per_rank() * world_size entries and takes every
/// world_size-th of them starting at `rank`.
///
/// Tail policy: when N is not divisible by world_size the last N % world_size
/// entries of the *shuffled* order are dropped for that epoch, so every rank
/// gets exactly floor(N / world_size) samples and all ranks run the same
/// number of steps. Within an epoch every kept sample is seen by exactly one
/// rank exactly once; the dropped ones differ from epoch to epoch. With
/// shuffle off the order is 0..N-1 and the last N % world_size samples are
/// always dropped.
/// @code
///   ringflow::data::sampler s(train.size(), comm.rank(), comm.size(), 42);
///   for (std::uint64_t e = 0; e < epochs; ++e) {
///     s.set_epoch(e);
///     ringflow::data::prefetcher p(train, s.remaining(), 128);
///     ...
///   }
/// @endcode
class sampler {
 public:
  /// Throws usage_error when world_size < 1, rank is outside
  /// [0, world_size) or dataset_size < world_size.
  sampler(std::size_t dataset_size, int rank, int world_size, std::uint64_t seed,
          bool shuffle = true);

  /// Selects the epoch (reshuffles) and rewinds position() to 0.
  void set_epoch(std::uint64_t epoch);
  std::uint64_t epoch() const { return epoch_; }

  /// This rank's sample indices for the current epoch, in visiting order
  /// (per_rank() of them).
  const std::vector<std::size_t>& indices() const { return indices_; }
  /// The indices not consumed yet: indices()[position()..].
  std::span<const std::size_t> remaining() const;

  /// Marks `n` more indices consumed (call once per step with the batch
  /// size). Clamped to the end of the epoch.
  void advance(std::size_t n);
  std::size_t position() const { return position_; }

  /// Samples per rank per epoch: floor(dataset_size / world_size).
  std::size_t per_rank() const { return per_rank_; }
  /// Samples left out each epoch: dataset_size % world_size.
  std::size_t dropped_per_epoch() const { return dataset_size_ - per_rank_ * world_size_; }
  std::size_t dataset_size() const { return dataset_size_; }
  int rank() const { return rank_; }
  int world_size() const { return static_cast<int>(world_size_); }
  std::uint64_t seed() const { return seed_; }

  /// Snapshot for a checkpoint.
  sampler_state state() const { return {seed_, epoch_, position_}; }
  /// Restores a snapshot: selects state.epoch, then sets the position.
  /// Throws usage_error when state.position is past the end of the epoch.
  void load_state(const sampler_state& state);

 private:
  void build_indices();

  std::size_t dataset_size_;
  int rank_;
  std::size_t world_size_;
  std::uint64_t seed_;
  bool shuffle_;
  std::size_t per_rank_;
  std::uint64_t epoch_ = 0;
  std::size_t position_ = 0;
  std::vector<std::size_t> indices_;
};

}  // namespace ringflow::data
