// request plumbing shared by every backend, and the default timeout.
#include "ringflow/comm/transport.hpp"

#include <atomic>
#include <cstdlib>
#include <exception>

#include "ringflow/core/env.hpp"
#include "ringflow/core/error.hpp"
#include "ringflow/core/log.hpp"

namespace ringflow {

request& request::operator=(request&& other) noexcept {
  if (this != &other) {
    if (state_) {
      try {
        state_->wait();
      } catch (const std::exception& e) {
        log::error("a pending request was overwritten and failed: {}", e.what());
      }
    }
    state_ = std::move(other.state_);
  }
  return *this;
}

request::~request() {
  if (!state_) return;
  try {
    state_->wait();
  } catch (const std::exception& e) {
    log::error("a pending request was destroyed and failed: {}", e.what());
  }
}

bool request::test() {
  if (!state_) return true;
  if (!state_->test()) return false;
  state_.reset();
  return true;
}

void request::wait() {
  if (!state_) return;
  // Reset even on failure: a failed request is finished, not pending.
  auto s = std::move(state_);
  s->wait();
}

void wait_all(std::span<request> requests) {
  std::exception_ptr first;
  for (auto& r : requests) {
    try {
      r.wait();
    } catch (...) {
      if (!first) first = std::current_exception();
    }
  }
  if (first) std::rethrow_exception(first);
}

transport::~transport() {
  if (flight_) detail::retire_flight_ring(flight_);
}

void transport::make_flight() {
  flight_made_ = true;
  flight_ = detail::make_flight_ring(*this, flight_id_);
}

std::chrono::milliseconds default_timeout() {
  static const std::chrono::milliseconds value = [] {
    // Seconds, 0 = forever; up to about 30 years, so the milliseconds fit.
    const double seconds =
        env::real("RINGFLOW_TIMEOUT", 600.0, {.lo = 0, .hi = 1e9}, env::malformed::warn);
    if (seconds == 0) return std::chrono::milliseconds::max();
    return std::chrono::milliseconds(static_cast<long long>(seconds * 1000.0));
  }();
  return value;
}

namespace detail {
namespace {
thread_local bool progress_thread = false;
std::atomic<int> alive_progress_threads{0};
}  // namespace
bool on_progress_thread() noexcept { return progress_thread; }
void set_progress_thread(bool on) noexcept {
  if (on == progress_thread) return;
  progress_thread = on;
  alive_progress_threads.fetch_add(on ? 1 : -1, std::memory_order_relaxed);
}
int progress_threads() noexcept { return alive_progress_threads.load(std::memory_order_relaxed); }
}  // namespace detail

}  // namespace ringflow
