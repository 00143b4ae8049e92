// The flight recorder: every transport keeps its last N collectives
// (sequence, kind, dtype, op, count, root, algorithm, the peer and tag it
// waits on, start and end times, state) in a fixed ring of records, so that
// after a hang or a failure each rank can say where it was. Dumps are JSON
// lines, one file per rank (docs/diagnostics.md); `ringflow-doctor` reads
// the dumps of all ranks and says which rank is behind and which disagree.
#pragma once

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "ringflow/comm/fingerprint.hpp"
#include "ringflow/core/dtype.hpp"
#include "ringflow/core/reduce_op.hpp"

namespace ringflow {
class transport;

namespace flight {

/// Where a recorded collective is.
enum class state : std::uint8_t { empty = 0, running = 1, done = 2, failed = 3 };
std::string_view state_name(state s);

/// One recorded collective, copied out of the ring (see recent()).
struct entry {
  std::uint64_t sequence = 0;
  coll_kind kind = coll_kind::allreduce;
  dtype type = dtype::f32;
  op_kind op = op_kind::sum;
  std::uint64_t count = 0;
  int root = -1;
  std::string algorithm;  // "" until the collective picked one
  state st = state::empty;
  std::int64_t start_ns = 0;  // system clock, ns since the epoch
  std::int64_t end_ns = 0;    // 0 while running
  int wait_peer = -1;         // the peer of the last wait that had to block (-1: none, or all)
  int wait_tag = -1;
  std::int64_t wait_since_ns = 0;  // when that wait began to block
};

/// RINGFLOW_FLIGHT: unset or 1 records; 0/off/false/no turns recording off.
bool enabled() noexcept;
/// RINGFLOW_FLIGHT_SIZE: records kept per communicator (default 256, 1..65536).
std::size_t ring_size() noexcept;

/// The collectives recorded on this transport (oldest first; at most
/// ring_size()); empty when recording is off.
std::vector<entry> recent(const transport& t);

/// RINGFLOW_FLIGHT_DIR if set, else the current directory.
std::string directory();
/// The file dump() writes: <directory()>/ringflow-flight.<rank>.jsonl, where
/// <rank> is the MPI world rank, or "pid<pid>" outside MPI.
std::string default_path();

/// Writes every live communicator's records (and those of the last few
/// destroyed ones) to default_path(), replacing the file; returns the path.
/// `reason` goes into the file's header line. Throws ringflow::error when
/// the file cannot be written.
///
/// @code
/// ringflow::flight::dump("before checkpoint");   // ./ringflow-flight.0.jsonl
/// @endcode
std::string dump(std::string_view reason = "request");
/// As dump(), to `path`.
void dump_to(const std::string& path, std::string_view reason = "request");

}  // namespace flight

namespace detail {

/// The recorder's clock: the CPU's time-stamp counter on x86-64 (a few ns
/// to read, where clock_gettime takes ~20), the steady clock elsewhere.
/// Snapshots turn ticks into wall-clock ns (a rate measured between the
/// first ring's creation and the snapshot).
inline std::int64_t flight_ticks() noexcept {
#if defined(__x86_64__) || defined(_M_X64)
  return static_cast<std::int64_t>(__builtin_ia32_rdtsc());
#else
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
#endif
}

/// One slot of a ring. Written by the thread running the collective, read
/// by whichever thread dumps: every field is a relaxed atomic, and
/// `version` (odd while begin() rewrites the slot) lets a reader notice a
/// slot that was reused under it.
struct flight_record {
  std::atomic<std::uint32_t> version{0};
  std::atomic<std::uint8_t> kind{0}, type{0}, op{0}, st{0};
  std::atomic<std::int32_t> root{-1}, wait_peer{-1}, wait_tag{-1};
  std::atomic<std::uint64_t> sequence{0}, count{0};
  std::atomic<std::int64_t> start{0}, end{0}, wait_since{0};  // flight_ticks(); 0: not yet
  std::atomic<const char*> algorithm{nullptr};                // a string literal, or null

  /// Notes the peer and tag a wait blocks on (the first blocking wait of
  /// each peer/tag pair: a changed pair restarts wait_since).
  void note_wait(int peer, int tag) noexcept {
    if (wait_peer.load(std::memory_order_relaxed) == peer &&
        wait_tag.load(std::memory_order_relaxed) == tag) {
      return;
    }
    wait_since.store(flight_ticks(), std::memory_order_relaxed);
    wait_peer.store(peer, std::memory_order_relaxed);
    wait_tag.store(tag, std::memory_order_relaxed);
  }
};

/// The ring of one transport (one communicator).
class flight_ring {
 public:
  flight_ring(std::size_t slots, std::uint64_t comm_id, int rank, int size,
              std::string_view backend);

  /// Records the start of collective `seq` and returns its slot.
  flight_record* begin(std::uint64_t seq, coll_kind kind, dtype type, op_kind op,
                       std::uint64_t count, int root) noexcept {
    flight_record& r = slots_[seq % n_];
    const std::uint32_t v = r.version.load(std::memory_order_relaxed);
    // Seqlock without fences (ThreadSanitizer does not model them): the
    // odd version is ordered before every field by the fields' release
    // stores (plain moves on x86-64).
    r.version.store(v + 1, std::memory_order_relaxed);
    r.sequence.store(seq, std::memory_order_release);
    r.kind.store(static_cast<std::uint8_t>(kind), std::memory_order_release);
    r.type.store(static_cast<std::uint8_t>(type), std::memory_order_release);
    r.op.store(static_cast<std::uint8_t>(op), std::memory_order_release);
    r.count.store(count, std::memory_order_release);
    r.root.store(root, std::memory_order_release);
    r.algorithm.store(nullptr, std::memory_order_release);
    r.wait_peer.store(-1, std::memory_order_release);
    r.wait_tag.store(-1, std::memory_order_release);
    r.wait_since.store(0, std::memory_order_release);
    r.end.store(0, std::memory_order_release);
    r.start.store(flight_ticks(), std::memory_order_release);
    r.st.store(static_cast<std::uint8_t>(flight::state::running), std::memory_order_release);
    r.version.store(v + 2, std::memory_order_release);
    started_.store(seq + 1, std::memory_order_relaxed);
    return &r;
  }

  /// Records the end of the collective in `r` (from begin()).
  static void end(flight_record* r, bool ok) noexcept {
    r->end.store(flight_ticks(), std::memory_order_relaxed);
    r->st.store(static_cast<std::uint8_t>(ok ? flight::state::done : flight::state::failed),
                std::memory_order_release);
  }

  std::vector<flight::entry> snapshot() const;

  std::uint64_t comm_id() const noexcept { return comm_id_; }
  int rank() const noexcept { return rank_; }
  int size() const noexcept { return size_; }
  const std::string& backend() const noexcept { return backend_; }
  std::uint64_t started() const noexcept { return started_.load(std::memory_order_relaxed); }
  std::size_t slots() const noexcept { return n_; }
  // Set by the registry: the how-manyth ring with this comm_id and rank in
  // this process (world() called twice: instances 0 and 1).
  int instance = 0;
  std::atomic<bool> retired{false};

 private:
  std::unique_ptr<flight_record[]> slots_;
  std::size_t n_;
  std::uint64_t comm_id_;
  int rank_, size_;
  std::string backend_;
  std::atomic<std::uint64_t> started_{0};
};

/// Creates the ring of transport `t` (null when recording is off) and
/// registers it for dumps.
std::shared_ptr<flight_ring> make_flight_ring(const transport& t, std::uint64_t comm_id);
/// The transport of `ring` is gone: its records stay dumpable for a while
/// (the last few destroyed communicators are kept).
void retire_flight_ring(const std::shared_ptr<flight_ring>& ring) noexcept;

/// The MPI world rank of this process (names the dump file); set by the MPI
/// backend. Also installs the SIGTERM/SIGUSR1 handlers when recording is on.
void flight_set_process_rank(int rank) noexcept;
/// An automatic dump after a failure (`reason` says which). Written when
/// this process is an MPI rank or RINGFLOW_FLIGHT_DIR is set (so test
/// programs that provoke errors on purpose do not litter their directory);
/// never throws, logs where it wrote.
void flight_dump_on_failure(std::string_view reason) noexcept;

/// Mixes parts into a communicator id (the same on every member).
constexpr std::uint64_t flight_mix(std::uint64_t a, std::uint64_t b) noexcept {
  std::uint64_t h = a ^ (b + 0x9e3779b97f4a7c15ull + (a << 6) + (a >> 2));
  h ^= h >> 31;
  h *= 0xbf58476d1ce4e5b9ull;
  h ^= h >> 29;
  return h;
}

}  // namespace detail
}  // namespace ringflow
