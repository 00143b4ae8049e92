// The progress thread behind the nonblocking collectives.
#include "ringflow/coll/async.hpp"

#include <fmt/format.h>

#include <deque>
#include <thread>

#include "ringflow/core/log.hpp"

namespace ringflow {
namespace detail {
namespace {

// One per communicator (kept in its slot<async_engine>): a FIFO of work run by one
// thread on a duplicate communicator, so async traffic never mixes with the
// caller's blocking collectives on the original.
class async_engine {
 public:
  explicit async_engine(communicator dup) : dup_(std::move(dup)), thread_([this] { loop(); }) {}

  ~async_engine() {
    {
      std::lock_guard lock(mutex_);
      stopping_ = true;
    }
    wake_.notify_all();
    thread_.join();
  }

  std::shared_ptr<async_state> push(std::function<void(const communicator&)> work) {
    auto state = std::make_shared<async_state>();
    {
      std::lock_guard lock(mutex_);
      queue_.push_back({std::move(work), state});
    }
    wake_.notify_one();
    return state;
  }

 private:
  struct item {
    std::function<void(const communicator&)> work;
    std::shared_ptr<async_state> state;
  };

  void loop() {
    detail::set_progress_thread(true);  // its waits yield to the caller's compute
    for (;;) {
      item next;
      {
        std::unique_lock lock(mutex_);
        wake_.wait(lock, [&] { return stopping_ || !queue_.empty(); });
        if (queue_.empty()) {  // stopping and drained
          detail::set_progress_thread(false);
          return;
        }
        next = std::move(queue_.front());
        queue_.pop_front();
      }
      std::exception_ptr error = failed_;
      if (!error) {
        try {
          next.work(dup_);
        } catch (...) {
          error = std::current_exception();
          // The group is in an unknown state now: fail everything after this
          // operation too rather than run it on a broken ring.
          failed_ = error;
        }
      }
      {
        std::lock_guard lock(next.state->mutex);
        next.state->done = true;
        next.state->error = error;
      }
      next.state->done_cv.notify_all();
    }
  }

  communicator dup_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::deque<item> queue_;
  bool stopping_ = false;
  std::exception_ptr failed_;
  std::thread thread_;  // last: starts after everything above exists
};

}  // namespace

std::shared_ptr<async_state> enqueue(const communicator& comm,
                                     std::function<void(const communicator&)> work) {
  async_engine& engine = comm.slot<async_engine>([&] {
    if (!comm.raw().concurrent_use_ok()) {
      throw not_supported_error(fmt::format(
          "nonblocking collectives on rank {}: the '{}' backend was not initialized for use from "
          "two threads; create ringflow::mpi::environment with threading::multiple (the default)",
          comm.rank(), comm.backend()));
    }
    // First async call on this communicator: every rank gets here at the same
    // point of its collective sequence, so the (collective) split is safe.
    return std::make_shared<async_engine>(comm.split(0, comm.rank()));
  });
  return engine.push(std::move(work));
}

}  // namespace detail

collective_handle& collective_handle::operator=(collective_handle&& other) noexcept {
  if (this != &other) {
    if (state_) {
      try {
        wait();
      } catch (const std::exception& e) {
        log::error("a pending collective was overwritten and failed: {}", e.what());
      }
    }
    state_ = std::move(other.state_);
  }
  return *this;
}

collective_handle::~collective_handle() {
  if (!state_) return;
  try {
    wait();
  } catch (const std::exception& e) {
    log::error("a pending collective was destroyed and failed: {}", e.what());
  }
}

void collective_handle::wait() {
  if (!state_) return;
  auto s = std::move(state_);
  std::unique_lock lock(s->mutex);
  s->done_cv.wait(lock, [&] { return s->done; });
  if (s->error) std::rethrow_exception(s->error);
}

bool collective_handle::test() {
  if (!state_) return true;
  {
    std::lock_guard lock(state_->mutex);
    if (!state_->done) return false;
  }
  wait();
  return true;
}

void wait_all(std::span<collective_handle> handles) {
  std::exception_ptr first;
  for (auto& h : handles) {
    try {
      h.wait();
    } catch (...) {
      if (!first) first = std::current_exception();
    }
  }
  if (first) std::rethrow_exception(first);
}

}  // namespace ringflow
