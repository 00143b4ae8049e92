// The transport interface every backend implements: rank, size and tagged
// point-to-point byte messages with nonblocking requests. Collectives in
// coll/ are written once against this interface.
#pragma once

#include <chrono>
#include <cstddef>
#include <memory>
#include <span>
#include <string>
#include <string_view>

#include "ringflow/core/dtype.hpp"
#include "ringflow/core/reduce_op.hpp"

namespace ringflow {

/// Tags 0..max_user_tag are the caller's; tags above are reserved for
/// collectives (so a user message can never match a collective's).
inline constexpr int max_user_tag = 16383;
inline constexpr int collective_tag_base = 16384;

namespace detail {
/// A pending operation inside a backend.
class request_state {
 public:
  virtual ~request_state() = default;
  /// True once complete; throws comm_error if the operation failed.
  virtual bool test() = 0;
  /// Blocks until complete or the transport's timeout passes (timeout_error).
  virtual void wait() = 0;
};
}  // namespace detail

/// A pending send or receive. Move-only. Its buffer must stay valid until
/// wait() or a true test(). Destroying a pending request waits for it (and
/// logs, never throws, if that fails).
class request {
 public:
  request() = default;
  explicit request(std::unique_ptr<detail::request_state> s) : state_(std::move(s)) {}
  request(request&&) noexcept = default;
  request& operator=(request&& other) noexcept;
  ~request();

  /// True when complete (an empty request is complete).
  bool test();
  /// Blocks until complete; rethrows the operation's error.
  void wait();
  bool pending() const noexcept { return static_cast<bool>(state_); }

 private:
  std::unique_ptr<detail::request_state> state_;
};

/// Waits for every request; if some fail, still waits for the rest, then
/// rethrows the first failure.
void wait_all(std::span<request> requests);

/// The seconds a blocking wait may take before timeout_error: RINGFLOW_TIMEOUT
/// (seconds, 0 = forever), default 300.
std::chrono::milliseconds default_timeout();

namespace detail {
/// now + timeout, saturating (a "forever" timeout never overflows).
inline std::chrono::steady_clock::time_point deadline_after(std::chrono::milliseconds timeout) {
  const auto now = std::chrono::steady_clock::now();
  if (timeout >= std::chrono::hours(24 * 365)) return std::chrono::steady_clock::time_point::max();
  return now + timeout;
}
}  // namespace detail

/// Backend interface. Messages between one (source, destination, tag) triple
/// are matched in the order they were posted, as in MPI.
class transport {
 public:
  virtual ~transport() = default;

  virtual int rank() const noexcept = 0;
  virtual int size() const noexcept = 0;
  /// "mpi", "local", ...
  virtual std::string_view name() const noexcept = 0;

  /// Posts a send of `bytes` bytes to `peer`.
  virtual request isend(const void* data, std::size_t bytes, int peer, int tag) = 0;
  /// Posts a receive of exactly `bytes` bytes from `peer`; a message of
  /// another size completes the request with a comm_error naming both sizes.
  virtual request irecv(void* data, std::size_t bytes, int peer, int tag) = 0;

  /// Collective: ranks with the same color form a new transport, ordered by
  /// (key, old rank). A negative color takes no part and gets nullptr.
  virtual std::shared_ptr<transport> split(int color, int key) = 0;

  /// The backend's own allreduce (MPI_Allreduce), if it has one for this
  /// dtype/op. Returns false when unsupported.
  virtual bool native_allreduce(const void* /*in*/, void* /*out*/, std::size_t /*count*/,
                                dtype /*type*/, op_kind /*op*/) {
    return false;
  }

  /// True when two threads may use this transport at once (the async
  /// collectives' progress thread needs it). MPI: MPI_THREAD_MULTIPLE.
  virtual bool concurrent_use_ok() const noexcept { return true; }

  /// How long a blocking wait may take on this transport.
  std::chrono::milliseconds timeout() const noexcept { return timeout_; }
  void set_timeout(std::chrono::milliseconds t) noexcept { timeout_ = t; }

 private:
  std::chrono::milliseconds timeout_ = default_timeout();
};

}  // namespace ringflow
