// Shared-memory allreduce for the ranks of one node: segment set-up over MPI,
// the block pipeline, and waits that time out instead of hanging.
//
// Segment (one per communicator, kept in its slot (communicator::slot) so it
// lives and dies with the communicator):
//   header line | per rank: arrived, reduced, descriptor lines | data
//   data = staging[rank][2 slots] + result[2 slots], each block_bytes long.
// Block h of a call (global index g = first block of the call + h) uses slot
// g % 2. Rank r, per block:
//   copy in:  the parts of its input block that other ranks reduce -> staging[r]
//             (its own slice it reduces straight from its user buffer)
//   arrived[r] = g + 1
//   wait arrived[q] > g for all q; reduce slice r, reading the p inputs in rank
//             order, into result (and straight into its own output)
//   reduced[r] = g + 1; copy in block h + 1 meanwhile
//   wait reduced[q] > g for all q; copy the other slices of result -> output
// Two slots suffice without further waits: a rank stages block g into slot
// g % 2 only after it saw every rank's reduced > g - 2 (all read block g - 2
// from it), and writes result slot g % 2 only after every rank arrived at g,
// which each does after copying out block g - 2.
#include "ringflow/backends/shm.hpp"

#include <fcntl.h>
#include <linux/futex.h>
#include <mpi.h>
#include <sched.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "mpi_check.hpp"
#include "mpi_job.hpp"
#include "ringflow/backends/mpi_interop.hpp"
#include "ringflow/coll/cost_model.hpp"
#include "ringflow/coll/registry.hpp"
#include "ringflow/core/dtype_visit.hpp"
#include "ringflow/core/env.hpp"
#include "ringflow/core/log.hpp"
#include "waiting.hpp"

namespace ringflow {
namespace {

// Counters each get two cache lines: the adjacent-line prefetcher pairs lines,
// and a spinning reader must not steal the line another rank is writing.
constexpr std::size_t line_bytes = 128;
constexpr int slots = 2;
constexpr std::uint64_t magic = 0x72666c6f77736d31ull;  // "rflowsm1"
// Reduce in sub-blocks this size so the partial result stays in L1 while the
// next rank's input is folded in.
constexpr std::size_t sub_block_bytes = 8 * 1024;
// Slice boundaries fall on this many bytes, so no two ranks write one line.
constexpr std::size_t slice_align = 64;
// How long a waiting rank polls before it sleeps on a futex. With a core per
// rank: long enough to catch a peer that is a few microseconds behind, short
// enough to hand the core back when the peer was descheduled. On this loaded
// 2-core node 20-50 us beat 1 ms and 100 ms clearly (docs/shm.md).
// Oversubscribed (more ranks than cores), the awaited rank may need this
// very core: sleep almost at once.
constexpr auto spin_for = std::chrono::microseconds(50);
constexpr auto spin_for_oversubscribed = std::chrono::microseconds(2);

// RINGFLOW_SHM_SPIN_US overrides the poll time (rank 0's, for tuning).
std::chrono::microseconds spin_from_env(std::chrono::microseconds fallback) {
  return std::chrono::microseconds(
      env::integer("RINGFLOW_SHM_SPIN_US", fallback.count(), {0, 1'000'000}, env::malformed::warn));
}
// A sleeping rank wakes at least this often to check its deadline and
// whether a peer gave up.
constexpr long sleep_slice_ns = 2'000'000;
// The smallest block a call is cut into (below, per-block costs dominate).
constexpr std::size_t min_block_bytes = 64 * 1024;

// A published counter: the value, and how many ranks sleep waiting on it
// (the publisher only pays for a futex wake when someone sleeps).
struct counter_line {
  std::uint64_t value;
  std::uint32_t sleepers;
};

long futex(void* addr, int op, std::uint32_t val, const timespec* ts) {
  return syscall(SYS_futex, addr, op, val, ts, nullptr, 0);
}

// The futex word is the low half of the 64-bit counter (little-endian x86 and
// arm64): it changes with every increment, which is all FUTEX_WAIT compares.
std::uint32_t* futex_word(counter_line& c) { return reinterpret_cast<std::uint32_t*>(&c.value); }

void publish(counter_line& c, std::uint64_t v) {
  // seq_cst on both sides (store here, then load sleepers; increment sleepers
  // there, then load value) so a sleeper either sees v or is woken.
  std::atomic_ref<std::uint64_t>(c.value).store(v, std::memory_order_seq_cst);
  if (std::atomic_ref<std::uint32_t>(c.sleepers).load(std::memory_order_seq_cst) != 0) {
    futex(futex_word(c), FUTEX_WAKE, INT_MAX, nullptr);
  }
}

struct header {
  std::uint64_t magic;
  std::uint64_t block_bytes;
  std::int32_t size;
  std::int32_t broken;  // 0, or 1 + the rank that gave up: peers stop waiting
};

// What a rank is about to reduce; every rank must agree.
struct descriptor {
  std::uint64_t count;
  std::uint64_t first_block;
  std::uint32_t type;
  std::uint32_t op;
};

std::string errno_text(int e) { return std::strerror(e); }

void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#endif
}

// Per communicator: the mapped segment and where this rank stands in it.
struct node_state {
  bool usable = false;
  std::string why_not;  // when !usable
  int rank = 0;
  int size = 1;
  std::size_t block_bytes = shm::default_block_bytes;  // the largest block (slot size)
  std::byte* base = nullptr;
  std::size_t bytes = 0;
  std::size_t data_offset = 0;
  std::uint64_t next_block = 0;                // global index of this rank's next block
  bool oversubscribed = false;                 // rank 0's verdict, so all ranks wait alike
  std::chrono::microseconds spin{0};           // a caller polls this long before sleeping
  std::chrono::microseconds progress_spin{0};  // a progress thread (waiting.hpp)
  int broken_by = -1;                          // rank that failed; the segment's counters are lost
  std::vector<int> world_ranks;                // of each rank, for the job's failure notices

  node_state() = default;
  node_state(const node_state&) = delete;
  node_state& operator=(const node_state&) = delete;
  ~node_state() {
    if (base != nullptr) munmap(base, bytes);
  }

  header& head() const { return *reinterpret_cast<header*>(base); }
  counter_line& arrived(int r) const {
    return *reinterpret_cast<counter_line*>(base +
                                            line_bytes * (1 + 3 * static_cast<std::size_t>(r)));
  }
  counter_line& reduced(int r) const {
    return *reinterpret_cast<counter_line*>(base +
                                            line_bytes * (2 + 3 * static_cast<std::size_t>(r)));
  }
  descriptor& desc(int r) const {
    return *reinterpret_cast<descriptor*>(base +
                                          line_bytes * (3 + 3 * static_cast<std::size_t>(r)));
  }
  std::byte* staging(int r, int slot) const {
    return base + data_offset +
           (static_cast<std::size_t>(r) * slots + static_cast<std::size_t>(slot)) * block_bytes;
  }
  std::byte* result(int slot) const {
    return base + data_offset +
           (static_cast<std::size_t>(size) * slots + static_cast<std::size_t>(slot)) * block_bytes;
  }
};

std::size_t control_bytes(int size) {
  const std::size_t c = line_bytes * (1 + 3 * static_cast<std::size_t>(size));
  return (c + 4095) / 4096 * 4096;
}

// RINGFLOW_SHM_BLOCK: bytes with an optional K, M or G suffix, from 4 KiB to
// 256 MiB (clamped), rounded up to 4 KiB.
std::size_t block_from_env() {
  const std::uint64_t v = env::bytes("RINGFLOW_SHM_BLOCK", shm::default_block_bytes, 4096,
                                     256ull << 20, env::malformed::warn);
  return static_cast<std::size_t>((v + 4095) / 4096 * 4096);
}

// Collective over `mc`: finds the node, creates and maps the segment.
void set_up(node_state& st, MPI_Comm mc) {
  st.world_ranks = mpi::job::world_ranks(mc);
  MPI_Comm_rank(mc, &st.rank);
  MPI_Comm_size(mc, &st.size);
  MPI_Comm node = MPI_COMM_NULL;
  RINGFLOW_CHECK_MPI(MPI_Comm_split_type(mc, MPI_COMM_TYPE_SHARED, st.rank, MPI_INFO_NULL, &node),
                     fmt::format("in shm set-up on rank {}", st.rank));
  int local = 0;
  MPI_Comm_size(node, &local);
  MPI_Comm_free(&node);
  if (local != st.size) {
    // Every rank sees a node smaller than the communicator, so all agree.
    st.why_not = fmt::format(
        "the communicator's {} ranks span several nodes (rank {} shares its node with {}); the "
        "shm path works within one node: use a hierarchical or ring algorithm",
        st.size, st.rank, local);
    return;
  }
  st.usable = true;
  if (st.size == 1) return;  // nothing to share

  // Rank 0 decides everything that must agree (name, block, waiting style).
  struct {
    char name[64];
    std::uint64_t block;
    std::int32_t err;
    std::int32_t yield;  // callers: more ranks than cores
    std::int64_t spin_us;
    std::int64_t progress_spin_us;  // progress threads (waiting.hpp)
  } msg{};
  std::string failure;
  int fd = -1;
  mpi::waiting::probe(mc);  // every rank (collective the first time); the mpi backend's verdict
  if (st.rank == 0) {
    msg.block = block_from_env();
    msg.yield = mpi::waiting::yield_caller() ? 1 : 0;
    msg.spin_us = spin_from_env(msg.yield ? spin_for_oversubscribed : spin_for).count();
    msg.progress_spin_us =
        spin_from_env(mpi::waiting::yield_progress() ? spin_for_oversubscribed : spin_for).count();
    static std::atomic<unsigned> serial{0};
    const auto stamp = static_cast<unsigned long long>(
        std::chrono::steady_clock::now().time_since_epoch().count());
    std::snprintf(msg.name, sizeof msg.name, "/ringflow-shm-%d-%u-%llx", static_cast<int>(getpid()),
                  serial.fetch_add(1), stamp & 0xffffffffffull);
    fd = shm_open(msg.name, O_CREAT | O_EXCL | O_RDWR, 0600);
    if (fd < 0) msg.err = errno;
  }
  RINGFLOW_CHECK_MPI(MPI_Bcast(&msg, sizeof msg, MPI_BYTE, 0, mc),
                     fmt::format("in shm set-up on rank {}", st.rank));
  if (msg.err != 0) {
    throw comm_error(fmt::format(
        "shm set-up on rank {}: rank 0 could not create shared memory {}: {}; check that "
        "/dev/shm is mounted and writable, or use algo::ring",
        st.rank, msg.name, errno_text(msg.err)));
  }
  st.block_bytes = msg.block;
  st.oversubscribed = msg.yield != 0;
  st.spin = std::chrono::microseconds(msg.spin_us);
  st.progress_spin = std::chrono::microseconds(msg.progress_spin_us);
  st.data_offset = control_bytes(st.size);
  st.bytes = st.data_offset + (static_cast<std::size_t>(st.size) + 1) * slots * st.block_bytes;
  if (st.rank == 0) {
    // Allocate now: a /dev/shm too small for the segment is an error here,
    // not a SIGBUS in the middle of a later allreduce.
    if (const int e = posix_fallocate(fd, 0, static_cast<off_t>(st.bytes)); e != 0) {
      failure = fmt::format(
          "allocating {} bytes in /dev/shm: {} (set RINGFLOW_SHM_BLOCK "
          "smaller than {} to need less)",
          st.bytes, errno_text(e), st.block_bytes);
    }
  } else {
    fd = shm_open(msg.name, O_RDWR, 0600);
    if (fd < 0) failure = fmt::format("shm_open({}): {}", msg.name, errno_text(errno));
  }
  // Everyone waits for rank 0's allocation before mapping.
  int bad = failure.empty() ? -1 : st.rank, worst = -1;
  RINGFLOW_CHECK_MPI(MPI_Allreduce(&bad, &worst, 1, MPI_INT, MPI_MAX, mc),
                     fmt::format("in shm set-up on rank {}", st.rank));
  if (worst < 0) {
    // Not MAP_POPULATE: pages fault in as blocks first use them, so a
    // communicator that only reduces small buffers maps little.
    void* p = mmap(nullptr, st.bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) {
      failure = fmt::format("mmap({} bytes): {}", st.bytes, errno_text(errno));
    } else {
      st.base = static_cast<std::byte*>(p);
    }
  }
  if (fd >= 0) close(fd);
  bad = failure.empty() ? -1 : st.rank;
  RINGFLOW_CHECK_MPI(MPI_Allreduce(&bad, &worst, 1, MPI_INT, MPI_MAX, mc),
                     fmt::format("in shm set-up on rank {}", st.rank));
  // Every rank has mapped it (or failed): the name can go, so nothing is left
  // behind in /dev/shm even if a rank crashes later.
  if (st.rank == 0) shm_unlink(msg.name);
  if (worst >= 0) {
    throw comm_error(fmt::format(
        "shm set-up on rank {}: rank {} could not map the node's shared memory{}{}; check "
        "/dev/shm space and limits, or use algo::ring",
        st.rank, worst, failure.empty() ? "" : ": ", failure));
  }
  if (st.rank == 0) {
    st.head().magic = magic;
    st.head().block_bytes = st.block_bytes;
    st.head().size = st.size;
  }
  // The header is written before any rank publishes a counter.
  RINGFLOW_CHECK_MPI(MPI_Barrier(mc), fmt::format("in shm set-up on rank {}", st.rank));
  log::debug("shm: rank {} of {} mapped {} bytes (blocks up to {} KiB), {}", st.rank, st.size,
             st.bytes, st.block_bytes / 1024,
             st.oversubscribed ? "more ranks than cores" : "a core per rank");
}

// The communicator's state, set up on first use (collective then).
node_state& state_of(const communicator& comm) {
  if (comm.backend() != "mpi") {
    throw not_supported_error(fmt::format(
        "shm allreduce on rank {}: the communicator uses the '{}' backend; the shm path needs "
        "processes of the mpi backend (use algo::ring for threads)",
        comm.rank(), comm.backend()));
  }
  return comm.slot<node_state>([&] {
    auto st = std::make_shared<node_state>();
    set_up(*st, mpi::native_handle(comm));
    return st;
  });
}

node_state& usable_state_of(const communicator& comm) {
  node_state& st = state_of(comm);
  if (!st.usable) {
    throw not_supported_error(fmt::format("shm allreduce on rank {}: {}", st.rank, st.why_not));
  }
  return st;
}

// Waits for the other ranks' counters: polls briefly, then sleeps on a futex
// in slices, checking the deadline and whether a peer gave up; throws
// instead of hanging.
class waiter {
 public:
  waiter(node_state& st, std::chrono::milliseconds timeout, std::size_t count, dtype type,
         detail::flight_record* flight, transport* peers)
      : st_(st), timeout_(timeout), count_(count), type_(type), flight_(flight), peers_(peers) {}

  // Until counter(q).value >= target for every q != this rank.
  template <class Counter>
  void until(Counter counter, std::uint64_t target, const char* doing, std::uint64_t block,
             std::uint64_t blocks) {
    for (int q = 0; q < st_.size; ++q) {
      if (q == st_.rank) continue;
      counter_line& c = counter(q);
      if (std::atomic_ref<std::uint64_t>(c.value).load(std::memory_order_acquire) >= target) {
        continue;
      }
      slow_wait(c, target, q, doing, block, blocks);
    }
  }

 private:
  void slow_wait(counter_line& c, std::uint64_t target, int q, const char* doing,
                 std::uint64_t block, std::uint64_t blocks) {
    const auto start = std::chrono::steady_clock::now();
    // The flight recorder notes the rank waited on (tag -1: shared memory).
    if (flight_ != nullptr) flight_->note_wait(q, -1);
    if (!have_deadline_) {
      deadline_ = detail::deadline_after(timeout_);
      have_deadline_ = true;
    }
    std::atomic_ref<std::uint64_t> value(c.value);
    const auto spin = detail::on_progress_thread() || detail::progress_threads() > 0
                          ? st_.progress_spin
                          : st_.spin;
    for (unsigned polls = 1;; ++polls) {
      if (value.load(std::memory_order_acquire) >= target) return;
      cpu_relax();
      if ((polls & 63u) == 0 && std::chrono::steady_clock::now() - start > spin) break;
    }
    std::atomic_ref<std::uint32_t> sleepers(c.sleepers);
    const timespec slice{0, sleep_slice_ns};
    for (;;) {
      sleepers.fetch_add(1, std::memory_order_seq_cst);
      const std::uint64_t v = value.load(std::memory_order_seq_cst);
      if (v < target) {
        // Returns at once if the word moved since `v` was read (no lost wake).
        futex(futex_word(c), FUTEX_WAIT, static_cast<std::uint32_t>(v), &slice);
      }
      sleepers.fetch_sub(1, std::memory_order_seq_cst);
      if (value.load(std::memory_order_acquire) >= target) return;
      // A peer that ran another collective (or another algorithm: automatic
      // chooses by size, so mismatched sizes can pick differently) waits in
      // messages and probes this rank: answer it.
      if (peers_ != nullptr) peers_->answer_peers();
      check_peers_and_deadline(q, doing, block, blocks);
    }
  }

  void check_peers_and_deadline(int q, const char* doing, std::uint64_t block,
                                std::uint64_t blocks) {
    // A rank that failed elsewhere in the job, or left it, ends this wait.
    if (q >= 0 && static_cast<std::size_t>(q) < st_.world_ranks.size()) {
      mpi::job::check_peer(st_.world_ranks[static_cast<std::size_t>(q)], st_.rank,
                           fmt::format("shm allreduce of {} {} waiting for rank {} to {} block {}",
                                       count_, dtype_name(type_), q, doing, block + 1));
    }
    std::atomic_ref<std::int32_t> broken(st_.head().broken);
    if (const int b = broken.load(std::memory_order_relaxed); b != 0) {
      st_.broken_by = b - 1;
      throw comm_error(fmt::format(
          "rank {}: shm allreduce aborted because rank {} gave up in the same call (see its "
          "error); this communicator's shm segment is unusable: create a new communicator",
          st_.rank, b - 1));
    }
    if (std::chrono::steady_clock::now() > deadline_) {
      int expected = 0;
      broken.compare_exchange_strong(expected, st_.rank + 1);
      st_.broken_by = st_.rank;
      const std::string msg = fmt::format(
          "rank {}: shm allreduce of {} {} waited {} ms for rank {} to {} block {} of {} "
          "(RINGFLOW_TIMEOUT); is rank {} stuck, dead or calling a different collective?",
          st_.rank, count_, dtype_name(type_), timeout_.count(), q, doing, block + 1, blocks, q);
      mpi::job::fail(mpi::job::notice::failed, msg);
      throw timeout_error(msg);
    }
  }

  node_state& st_;
  std::chrono::milliseconds timeout_;
  std::size_t count_;
  dtype type_;
  detail::flight_record* flight_;
  transport* peers_;  // answers the peers' probes while this rank waits
  bool have_deadline_ = false;
  std::chrono::steady_clock::time_point deadline_{};
};

// Elements per block for a call of `count` elements: at least two blocks so
// staging block h+1 overlaps waiting for block h, but blocks as large as the
// slots allow, because every block costs two waits on all ranks, and a wait
// is what hurts most on a loaded or oversubscribed node. Depends only on
// values every rank shares, so all ranks cut the buffer alike.
std::size_t block_bytes_for(std::size_t bytes, std::size_t largest) {
  const std::size_t b = (bytes / 2 + 4095) / 4096 * 4096;
  return std::clamp(b, std::min(min_block_bytes, largest), largest);
}

template <class T>
std::size_t block_elems(const node_state& st, std::size_t count) {
  return block_bytes_for(count * sizeof(T), st.block_bytes) / sizeof(T);
}

// Slice `r` of a block of `n` elements, on slice_align byte boundaries.
struct slice {
  std::size_t offset = 0;
  std::size_t count = 0;
};

template <class T>
slice slice_of(std::size_t n, int p, int r) {
  constexpr std::size_t unit = std::max<std::size_t>(1, slice_align / sizeof(T));
  const std::size_t units = (n + unit - 1) / unit;
  const std::size_t per = units / static_cast<std::size_t>(p);
  const std::size_t extra = units % static_cast<std::size_t>(p);
  const auto i = static_cast<std::size_t>(r);
  const std::size_t first = i * per + std::min(i, extra);
  const std::size_t len = per + (i < extra ? 1 : 0);
  const std::size_t off = std::min(n, first * unit);
  return {off, std::min(n, (first + len) * unit) - off};
}

template <class T, class Op>
void combine(T* __restrict dst, const T* __restrict a, const T* __restrict b, std::size_t n,
             const Op& op) {
  for (std::size_t i = 0; i < n; ++i) dst[i] = op(a[i], b[i]);
}

template <class T, class Op>
void accumulate(T* __restrict dst, const T* __restrict b, std::size_t n, const Op& op) {
  for (std::size_t i = 0; i < n; ++i) dst[i] = op(dst[i], b[i]);
}

template <class T, class Op>
void finish_all(T* dst, std::size_t n, const Op& op, int p) {
  if constexpr (Op::kind == op_kind::avg) {
    for (std::size_t i = 0; i < n; ++i) dst[i] = finish(op, dst[i], p);
  } else {
    (void)dst, (void)n, (void)op, (void)p;
  }
}

template <class T, class Op>
void run(node_state& st, std::chrono::milliseconds timeout, const T* in, T* out, std::size_t count,
         const Op& op, detail::flight_record* flight, transport* peers) {
  const int p = st.size, me = st.rank;
  const std::size_t per_block = block_elems<T>(st, count);
  const std::size_t blocks = (count + per_block - 1) / per_block;
  const std::uint64_t first = st.next_block;
  waiter wait(st, timeout, count, dtype_of<T>, flight, peers);
  auto arrived = [&](int q) -> counter_line& { return st.arrived(q); };
  auto reduced = [&](int q) -> counter_line& { return st.reduced(q); };
  auto block_len = [&](std::size_t h) { return std::min(per_block, count - h * per_block); };

  // Stages the parts of block h the other ranks reduce; announces it.
  auto copy_in = [&](std::size_t h) {
    const std::uint64_t g = first + h;
    const std::size_t n = block_len(h);
    const slice own = slice_of<T>(n, p, me);
    const T* src = in + h * per_block;
    T* dst = reinterpret_cast<T*>(st.staging(me, static_cast<int>(g % slots)));
    std::memcpy(static_cast<void*>(dst), src, own.offset * sizeof(T));
    std::memcpy(static_cast<void*>(dst + own.offset + own.count), src + own.offset + own.count,
                (n - own.offset - own.count) * sizeof(T));
    publish(st.arrived(me), g + 1);
  };

  st.desc(me) = descriptor{count, first, static_cast<std::uint32_t>(dtype_of<T>),
                           static_cast<std::uint32_t>(Op::kind)};
  copy_in(0);

  const std::size_t sub = std::max<std::size_t>(1, sub_block_bytes / sizeof(T));
  std::vector<const T*> src(static_cast<std::size_t>(p));
  for (std::size_t h = 0; h < blocks; ++h) {
    const std::uint64_t g = first + h;
    const int slot = static_cast<int>(g % slots);
    const std::size_t n = block_len(h);
    const std::size_t base = h * per_block;

    wait.until(arrived, g + 1, "stage its input of", h, blocks);
    if (h == 0) {
      for (int q = 0; q < p; ++q) {
        const descriptor d = st.desc(q);
        if (d.count == count && d.type == static_cast<std::uint32_t>(dtype_of<T>) &&
            d.op == static_cast<std::uint32_t>(Op::kind) && d.first_block == first) {
          continue;
        }
        // Every rank sees some rank that differs from it, so all of them get
        // here; each closes block `first` so the segment stays usable, and
        // waits until all have read the descriptors before one moves on to
        // its next call (and rewrites its own).
        publish(st.reduced(me), first + 1);
        wait.until(reduced, first + 1, "check the arguments of", h, blocks);
        st.next_block = first + 1;
        throw usage_error(fmt::format(
            "shm allreduce on rank {}: rank {} called it with count={}, type={}, op={}, this rank "
            "with count={}, type={}, op={}; every rank must pass the same count, type and op",
            me, q, d.count, dtype_name(static_cast<dtype>(d.type)),
            op_name(static_cast<op_kind>(d.op)), count, dtype_name(dtype_of<T>),
            op_name(Op::kind)));
      }
    }

    // Reduce this rank's slice in rank order; its own input comes straight
    // from the user buffer, which nobody else reads.
    const slice own = slice_of<T>(n, p, me);
    T* res = reinterpret_cast<T*>(st.result(slot));
    for (int q = 0; q < p; ++q) {
      src[static_cast<std::size_t>(q)] =
          q == me ? in + base : reinterpret_cast<const T*>(st.staging(q, slot));
    }
    for (std::size_t o = own.offset; o < own.offset + own.count; o += sub) {
      const std::size_t m = std::min(sub, own.offset + own.count - o);
      combine(res + o, src[0] + o, src[1] + o, m, op);
      for (int q = 2; q < p; ++q) accumulate(res + o, src[static_cast<std::size_t>(q)] + o, m, op);
      finish_all(res + o, m, op, p);
      // In place, this overwrites input elements already folded in above.
      std::memcpy(static_cast<void*>(out + base + o), res + o, m * sizeof(T));
    }
    publish(st.reduced(me), g + 1);

    // Stage the next block while the others finish reducing this one.
    if (h + 1 < blocks) copy_in(h + 1);

    wait.until(reduced, g + 1, "reduce its slice of", h, blocks);
    std::memcpy(static_cast<void*>(out + base), res, own.offset * sizeof(T));
    std::memcpy(static_cast<void*>(out + base + own.offset + own.count),
                res + own.offset + own.count, (n - own.offset - own.count) * sizeof(T));
  }
  st.next_block = first + blocks;
}

template <class T>
void run_op(node_state& st, std::chrono::milliseconds timeout, const void* in, void* out,
            std::size_t count, op_kind op, detail::flight_record* flight, transport* peers) {
  const auto* i = static_cast<const T*>(in);
  auto* o = static_cast<T*>(out);
  switch (op) {
    case op_kind::sum: return run(st, timeout, i, o, count, sum_op{}, flight, peers);
    case op_kind::prod: return run(st, timeout, i, o, count, prod_op{}, flight, peers);
    case op_kind::min: return run(st, timeout, i, o, count, min_op{}, flight, peers);
    case op_kind::max: return run(st, timeout, i, o, count, max_op{}, flight, peers);
    case op_kind::avg: return run(st, timeout, i, o, count, avg_op{}, flight, peers);
  }
  throw usage_error(
      fmt::format("shm allreduce on rank {}: unknown reduce op {}", st.rank, static_cast<int>(op)));
}

// One rank: a copy, and avg divides by 1 like every other algorithm does.
template <class T>
void single_rank(const void* in, void* out, std::size_t count, op_kind op) {
  auto* o = static_cast<T*>(out);
  if (in != out) std::memcpy(out, in, count * sizeof(T));
  if (op == op_kind::avg) finish_all(o, count, avg_op{}, 1);
}

}  // namespace

namespace detail {

void shm_allreduce(const communicator& comm, const void* in, void* out, std::size_t count,
                   dtype type, op_kind op) {
  node_state& st = usable_state_of(comm);
  if (st.broken_by >= 0) {
    throw comm_error(fmt::format(
        "shm allreduce on rank {}: this communicator's shm segment is unusable since rank {} "
        "gave up in an earlier call (timeout or error); create a new communicator to go on",
        st.rank, st.broken_by));
  }
  if (count == 0) return;
  visit_dtype(type, [&]<class T>(type_tag<T>) {
    if (st.size == 1) {
      single_rank<T>(in, out, count, op);
    } else {
      run_op<T>(st, comm.raw().timeout(), in, out, count, op, comm.raw().flight_current(),
                &comm.raw());
    }
  });
}

// The cost model's prediction for algo::shm (registered with it below).
// Per block two waits on every rank of the node; each rank copies (p-1)/p of
// the buffer in and out and reads its own input once more to reduce
// (docs/shm.md: 1 + 2(p-1)/p bytes of traffic per byte beyond the ring's
// messages; measured -np 2 here, 64 KiB to 1 MiB: 1.3x to 2.3x the ring),
// and reduces its slice after the first wait with nothing to overlap it
// with. Measured here: -np 2, 16 to 64 KiB, ~0.8 ns per byte of buffer,
// about 5x the message beta per byte of that traffic (the copies go through
// two cores' caches; a message is one kernel copy). A wait needs every rank
// of the node to have arrived, so an oversubscribed node pays a descheduled
// peer for each other rank (-np 4 here: ~80 us at 4 KiB, where the trees
// take ~34 us).
double shm_cost(const cost_model& m, const cluster_shape& s, std::size_t bytes) {
  if (!s.shm || s.nodes > 1) return -1;
  const int p = s.ranks;
  if (p <= 1) return 0;
  const double n = static_cast<double>(bytes);
  const double block = static_cast<double>(block_bytes_for(bytes, shm::default_block_bytes));
  const double blocks = std::max(1.0, std::ceil(n / block));
  constexpr double copy_factor = 5;
  const double pen = m.oversubscribed_step * oversubscription(s);
  const double moved = (1.0 + 2.0 * (p - 1) / p) * n;
  const double wait = m.intra.alpha + pen * (s.ranks_per_node - 1);
  return blocks * 2 * wait + moved * copy_factor * m.intra.beta + (p - 1.0) / p * n * m.gamma;
}

bool shm_register() noexcept {
  static const bool done = [] {
    ext::register_algorithm(algo::shm, &shm::try_allreduce, &shm_cost);
    return true;
  }();
  return done;
}

}  // namespace detail

namespace shm {

bool try_allreduce(const communicator& comm, void* out, const void* in, std::size_t count,
                   dtype type, op_kind op) {
  if (comm.backend() != "mpi") return false;
  if (!state_of(comm).usable) return false;
  detail::shm_allreduce(comm, in, out, count, type, op);
  return true;
}

bool usable(const communicator& comm) {
  if (comm.backend() != "mpi") return false;
  return state_of(comm).usable;
}

std::size_t block_bytes(const communicator& comm) { return usable_state_of(comm).block_bytes; }

}  // namespace shm
}  // namespace ringflow
