// The per-epoch permutation and the rank-sharding sampler.
#include "ringflow/data/sampler.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <numeric>
#include <random>

#include "ringflow/core/error.hpp"

namespace ringflow::data {
namespace {

// splitmix64 finalizer: spreads (seed, epoch) so nearby seeds and epochs give
// unrelated generator states.
std::uint64_t mix64(std::uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

}  // namespace

std::vector<std::size_t> epoch_permutation(std::size_t n, std::uint64_t seed, std::uint64_t epoch) {
  std::vector<std::size_t> p(n);
  std::iota(p.begin(), p.end(), std::size_t{0});
  // std::mt19937_64's output sequence is fixed by the standard for a given
  // seed, so the permutation is the same with every standard library.
  std::mt19937_64 engine(mix64(mix64(seed) ^ epoch));
  for (std::size_t i = n; i > 1; --i) {
    const auto j = static_cast<std::size_t>(bounded_draw(engine, i));
    std::swap(p[i - 1], p[j]);
  }
  return p;
}

sampler::sampler(std::size_t dataset_size, int rank, int world_size, std::uint64_t seed,
                 bool shuffle)
    : dataset_size_(dataset_size), rank_(rank),
      world_size_(world_size > 0 ? static_cast<std::size_t>(world_size) : 0), seed_(seed),
      shuffle_(shuffle), per_rank_(0) {
  if (world_size < 1 || rank < 0 || rank >= world_size) {
    throw usage_error(fmt::format(
        "sampler: rank {} is not in [0, world_size={}); pass the communicator's rank and size",
        rank, world_size));
  }
  if (dataset_size < world_size_) {
    throw usage_error(fmt::format(
        "sampler: {} samples cannot be split over {} ranks (each rank needs at least one); use "
        "fewer ranks or more data",
        dataset_size, world_size));
  }
  per_rank_ = dataset_size_ / world_size_;
  build_indices();
}

void sampler::set_epoch(std::uint64_t epoch) {
  epoch_ = epoch;
  position_ = 0;
  build_indices();
}

std::span<const std::size_t> sampler::remaining() const {
  return std::span<const std::size_t>(indices_).subspan(position_);
}

void sampler::advance(std::size_t n) {
  position_ = std::min(position_ + std::min(n, per_rank_), per_rank_);
}

void sampler::load_state(const sampler_state& state) {
  if (state.position > per_rank_) {
    throw usage_error(fmt::format(
        "sampler::load_state: position {} is past the end of the epoch ({} samples per rank); "
        "the checkpoint was written for another dataset size or world size",
        state.position, per_rank_));
  }
  seed_ = state.seed;
  set_epoch(state.epoch);
  position_ = static_cast<std::size_t>(state.position);
}

void sampler::build_indices() {
  std::vector<std::size_t> order;
  if (shuffle_) {
    order = epoch_permutation(dataset_size_, seed_, epoch_);
  } else {
    order.resize(dataset_size_);
    std::iota(order.begin(), order.end(), std::size_t{0});
  }
  // Strided split of the kept prefix: rank r takes order[r], order[r + W], ...
  indices_.resize(per_rank_);
  for (std::size_t k = 0; k < per_rank_; ++k) {
    indices_[k] = order[static_cast<std::size_t>(rank_) + k * world_size_];
  }
}

}  // namespace ringflow::data
