// communicator: argument checks for point-to-point, split, shared state and its slots.
#include "ringflow/comm/communicator.hpp"

#include <fmt/format.h>

#include <array>
#include <atomic>
#include <cstdlib>
#include <mutex>
#include <string_view>
#include <vector>

namespace ringflow {

namespace {
// Types that keep per-communicator state: the async engine, the tuning
// context, shm's segment, a few more for tests. A fixed table keeps the
// lookup one atomic load.
constexpr int max_slots = 32;
std::atomic<int> slot_ids{0};
}  // namespace

struct communicator::state {
  std::atomic<std::uint64_t> sequence{0};
  std::atomic<ringflow::check_mode> mode{check_mode_from_env()};
  // slot<T>: `fast` is read without the lock; `owned` keeps the objects
  // alive and is destroyed in reverse order of making (a later slot may
  // use an earlier one).
  std::array<std::atomic<void*>, max_slots> fast{};
  std::recursive_mutex making;  // make() may make other slots
  std::vector<std::shared_ptr<void>> owned;
  ~state() {
    while (!owned.empty()) owned.pop_back();
  }
};

int communicator::next_slot_id() {
  const int id = slot_ids.fetch_add(1, std::memory_order_relaxed);
  if (id >= max_slots) {
    throw usage_error(
        fmt::format("communicator::slot: more than {} types keep per-communicator "
                    "state (raise max_slots in src/comm/communicator.cpp)",
                    max_slots));
  }
  return id;
}

void* communicator::slot_find(int id) const noexcept {
  return state_->fast[static_cast<std::size_t>(id)].load(std::memory_order_acquire);
}

void* communicator::slot_make(int id, const std::function<std::shared_ptr<void>()>& make) const {
  std::lock_guard lock(state_->making);
  auto& cell = state_->fast[static_cast<std::size_t>(id)];
  if (void* p = cell.load(std::memory_order_acquire)) return p;
  std::shared_ptr<void> made = make();
  if (!made) throw usage_error("communicator::slot: make() returned a null pointer");
  void* p = made.get();
  state_->owned.push_back(std::move(made));
  cell.store(p, std::memory_order_release);
  return p;
}

communicator::communicator(std::shared_ptr<transport> t)
    : transport_(std::move(t)), state_(std::make_shared<state>()) {
  if (!transport_) throw usage_error("communicator: null transport");
  // The flight recorder's ring is made now rather than in the first
  // collective, so that collective does not pay for it (nor skew the ranks).
  transport_->flight_ring();
}

communicator communicator::split(int color, int key) const {
  // Every member splits in the same order, so the child's flight-recorder
  // id (parent id, split index, color) is the same on all of its members.
  const std::uint64_t index = transport_->next_split_index();
  auto t = transport_->split(color, key);
  if (!t) return communicator();
  t->set_flight_id(
      detail::flight_mix(detail::flight_mix(transport_->flight_id(), index),
                         static_cast<std::uint64_t>(static_cast<std::int64_t>(color))));
  communicator c(std::move(t));
  c.set_check_mode(check_mode());
  return c;
}

ringflow::check_mode communicator::check_mode() const noexcept {
  return state_->mode.load(std::memory_order_relaxed);
}

void communicator::set_check_mode(ringflow::check_mode m) const noexcept {
  state_->mode.store(m, std::memory_order_relaxed);
}

std::uint64_t communicator::next_sequence() const noexcept {
  return state_->sequence.fetch_add(1, std::memory_order_relaxed);
}

void communicator::check_p2p(int peer, int tag, const char* what) const {
  if (peer < 0 || peer >= size()) {
    throw usage_error(fmt::format("{} on rank {}: peer {} is outside the communicator of size {}",
                                  what, rank(), peer, size()));
  }
  if (tag < 0 || tag > max_user_tag) {
    throw usage_error(fmt::format(
        "{} on rank {}: tag {} is outside [0, {}] (tags above are reserved for collectives)", what,
        rank(), tag, max_user_tag));
  }
}

}  // namespace ringflow
