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
#include <utility>
#include <vector>

#include "ringflow/comm/fingerprint.hpp"
#include "ringflow/comm/flight.hpp"
#include "ringflow/core/dtype.hpp"
#include "ringflow/core/reduce_op.hpp"

namespace ringflow {

/// Tags 0..max_user_tag are the caller's; tags above are reserved for
/// collectives (so a user message can never match a collective's).
inline constexpr int max_user_tag = 16383;
inline constexpr int collective_tag_base = 16384;
/// Collective tags whose messages carry stamps (check_mode::stamp): the
/// algorithms' tags, not the full check's exchange (+100) nor split (+4000).
inline constexpr int fingerprint_tag = collective_tag_base + 100;
/// A rank stalled in a collective asks its peer what it ran (stamp mode).
inline constexpr int stall_probe_tag = collective_tag_base + 101;
inline constexpr int stamped_tag_end = collective_tag_base + 4000;

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
/// (seconds, 0 = forever), default 600 (NCCL's default in PyTorch).
std::chrono::milliseconds default_timeout();

namespace detail {
/// now + timeout, saturating (a "forever" timeout never overflows).
inline std::chrono::steady_clock::time_point deadline_after(std::chrono::milliseconds timeout) {
  const auto now = std::chrono::steady_clock::now();
  if (timeout >= std::chrono::hours(24 * 365)) return std::chrono::steady_clock::time_point::max();
  return now + timeout;
}

/// Whether the calling thread drives collectives in the background (the
/// async engine's progress thread, coll/async.cpp). Its waits compete for
/// the cores with the caller's own compute (backward, the optimizer), so
/// backends let it give its core up sooner than a caller that waits.
bool on_progress_thread() noexcept;
/// Marks the calling thread as a progress thread (or not, as it ends).
void set_progress_thread(bool on) noexcept;
/// Progress threads alive in this process. While there is one, every thread
/// of the rank shares the cores with it, the caller's waits included.
int progress_threads() noexcept;
}  // namespace detail

/// Backend interface. Messages between one (source, destination, tag) triple
/// are matched in the order they were posted, as in MPI.
class transport {
 public:
  transport() = default;
  virtual ~transport();

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

  /// True when the ranks are processes that can map one shared-memory
  /// segment when they run on one host (the MPI backend): what the
  /// registered algo::shm needs. coll/ asks this instead of naming backends.
  virtual bool processes_can_share_memory() const noexcept { return false; }

  /// Called by waits that do not go through this transport (the shm
  /// backend's shared-memory waits) while they block, so the peers' checks
  /// are still answered: the MPI backend answers a stalled peer's stamp
  /// probe here, which turns a mismatched call into a mismatch error on
  /// every rank instead of a timeout. Never blocks; throws what it finds.
  virtual void answer_peers() {}

  /// How long a blocking wait may take on this transport.
  std::chrono::milliseconds timeout() const noexcept { return timeout_; }
  void set_timeout(std::chrono::milliseconds t) noexcept { timeout_ = t; }

  /// Stamp mode (check_mode::stamp): begin_collective hands over the
  /// collective's fingerprint; until the next call, the backend attaches it
  /// to the first message of each (peer, tag) of the collective and compares
  /// it on arrival. end_stamps() stops (check mode off or full).
  void begin_stamps(const fingerprint& fp) noexcept {
    stamp_ = fp;
    stamping_ = true;
    sent_.clear();
    received_.clear();
    history_[fp.sequence % history_size] = {fp.sequence + 1, fp};
  }
  void end_stamps() noexcept { stamping_ = false; }

  /// Flight recorder (comm/flight.hpp): this transport's ring, created at
  /// its first collective (null when RINGFLOW_FLIGHT=0).
  detail::flight_ring* flight_ring() {
    if (!flight_made_) make_flight();
    return flight_.get();
  }
  const detail::flight_ring* flight_ring_if_made() const noexcept { return flight_.get(); }
  /// The record of the collective running now (null between collectives):
  /// backends note in it the peer and tag a wait blocks on.
  detail::flight_record* flight_current() const noexcept { return flight_current_; }
  void set_flight_current(detail::flight_record* r) noexcept { flight_current_ = r; }
  /// The communicator id records carry: the same on every member (backends
  /// set it for the groups they create; split children derive theirs).
  std::uint64_t flight_id() const noexcept { return flight_id_; }
  void set_flight_id(std::uint64_t id) noexcept { flight_id_ = id; }
  /// Counts communicator::split calls on this transport (child ids).
  std::uint64_t next_split_index() noexcept { return splits_++; }

 protected:
  /// For backends: the stamp a send (receive) of `tag` to (from) `peer`
  /// carries, or nullptr. The first message of each (peer, tag) of a
  /// collective carries one; both sides count alike, since messages of one
  /// (source, destination, tag) match in posting order.
  const fingerprint* stamp_for_send(int peer, int tag) {
    return stamping_ && stamped_tag(tag) && first_use(sent_, peer, tag) ? &stamp_ : nullptr;
  }
  const fingerprint* stamp_for_receive(int peer, int tag) {
    return stamping_ && stamped_tag(tag) && first_use(received_, peer, tag) ? &stamp_ : nullptr;
  }
  /// The stamp of every message of the current collective (backends that
  /// compare on every message, as the local one does), or nullptr.
  const fingerprint* current_stamp(int tag) const noexcept {
    return stamping_ && stamped_tag(tag) ? &stamp_ : nullptr;
  }
  /// What this rank ran as collective `sequence`, if it is among the last
  /// history_size stamped ones (a stalled peer's probe is compared with it).
  const fingerprint* stamp_of(std::uint64_t sequence) const noexcept {
    const auto& h = history_[sequence % history_size];
    return h.first == sequence + 1 ? &h.second : nullptr;
  }

 private:
  static bool stamped_tag(int tag) noexcept {
    return tag > collective_tag_base && tag < stamped_tag_end && tag != fingerprint_tag;
  }
  static bool first_use(std::vector<std::pair<int, int>>& used, int peer, int tag) {
    for (const auto& u : used) {
      if (u.first == peer && u.second == tag) return false;
    }
    used.emplace_back(peer, tag);
    return true;
  }

  static constexpr std::size_t history_size = 64;

  void make_flight();
  std::shared_ptr<detail::flight_ring> flight_;
  bool flight_made_ = false;
  detail::flight_record* flight_current_ = nullptr;
  std::uint64_t flight_id_ = 0;
  std::uint64_t splits_ = 0;

  std::chrono::milliseconds timeout_ = default_timeout();
  bool stamping_ = false;
  fingerprint stamp_;
  std::pair<std::uint64_t, fingerprint> history_[history_size] = {};  // (sequence + 1, what)
  std::vector<std::pair<int, int>> sent_, received_;  // (peer, tag) stamped this collective
};

namespace detail {
/// What a stamped message starts with: a marker and the sender's fingerprint.
struct stamp_header {
  static constexpr std::uint32_t magic_value = 0x52465354;  // "RFST"
  std::uint32_t magic = magic_value;
  std::uint32_t version = 1;
  fingerprint fp;
};
static_assert(sizeof(stamp_header) == 32);

/// The usage_error text for two ranks whose stamps differ.
std::string stamp_mismatch_text(int me, const fingerprint& mine, int peer,
                                const fingerprint& theirs);
}  // namespace detail

}  // namespace ringflow
