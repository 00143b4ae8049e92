// communicator: argument checks for point-to-point, split, shared state.
#include "ringflow/comm/communicator.hpp"

#include <fmt/format.h>

#include <atomic>
#include <cstdlib>
#include <string_view>

namespace ringflow {

struct communicator::state {
  std::atomic<std::uint64_t> sequence{0};
  std::atomic<ringflow::check_mode> mode{check_mode_from_env()};
  std::shared_ptr<void> attachment;
};

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
  t->set_flight_id(detail::flight_mix(detail::flight_mix(transport_->flight_id(), index),
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

std::shared_ptr<void>& communicator::attachment() const noexcept { return state_->attachment; }

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
