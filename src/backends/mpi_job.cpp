// The MPI job's control channel, broken state and watchdog (see mpi_job.hpp).
#include "mpi_job.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>

#include "ringflow/backends/mpi.hpp"
#include "ringflow/comm/flight.hpp"
#include "ringflow/core/error.hpp"
#include "ringflow/core/log.hpp"

namespace ringflow::mpi {
namespace job {
namespace {

using clock = std::chrono::steady_clock;

constexpr int notice_tag = 7;
constexpr std::int32_t notice_magic = 0x52464a42;  // "RFJB"

// One notice: fixed size, so every receive can post the same buffer.
struct message {
  std::int32_t magic = notice_magic;
  std::int32_t kind = 0;
  std::int32_t origin = -1;  // world rank that sent it
  std::int32_t length = 0;   // bytes of text used
  char text[1008] = {};
};
static_assert(sizeof(message) == 1024);

std::int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(clock::now().time_since_epoch())
      .count();
}

struct state {
  std::atomic<bool> active{false};  // the control channel exists
  MPI_Comm ctrl = MPI_COMM_NULL;
  int rank = -1;  // in MPI_COMM_WORLD
  int size = 0;
  bool multiple = false;  // MPI_THREAD_MULTIPLE: the watchdog may call MPI too

  std::mutex poll_mutex;  // the receive below, and reposting it
  MPI_Request recv = MPI_REQUEST_NULL;
  message inbox;

  std::unique_ptr<std::atomic<std::int64_t>[]> left_at;  // per world rank; 0: still here
  std::atomic<int> left_count{0};

  std::atomic<bool> broken{false};
  std::atomic<std::int64_t> broken_at{0};
  std::mutex text_mutex;
  std::string first_error;  // what broke the job, as this rank will report it
  int first_origin = -1;
  notice first_kind = notice::failed;

  std::thread watchdog;
  std::mutex wd_mutex;
  std::condition_variable wd_wake;
  bool wd_stop = false;
};

state& S() {
  static state s;
  return s;
}

std::atomic<bool> abort_policy{true};

// Sends `m` to every other world rank; waits a moment for the sends (they
// are small, so they leave at once) and abandons the rest.
void broadcast_notice(const message& m) noexcept {
  state& s = S();
  std::vector<MPI_Request> reqs;
  reqs.reserve(static_cast<std::size_t>(s.size));
  for (int q = 0; q < s.size; ++q) {
    if (q == s.rank) continue;
    MPI_Request r = MPI_REQUEST_NULL;
    if (MPI_Isend(&m, sizeof m, MPI_BYTE, q, notice_tag, s.ctrl, &r) == MPI_SUCCESS) {
      reqs.push_back(r);
    }
  }
  const auto until = clock::now() + std::chrono::milliseconds(500);
  int done = 0;
  while (!reqs.empty() && clock::now() < until) {
    if (MPI_Testall(static_cast<int>(reqs.size()), reqs.data(), &done, MPI_STATUSES_IGNORE) !=
            MPI_SUCCESS ||
        done) {
      break;
    }
    std::this_thread::yield();
  }
  if (!done) {
    for (auto& r : reqs) {
      if (r != MPI_REQUEST_NULL) MPI_Request_free(&r);
    }
  }
}

message make_message(notice kind, int origin, std::string_view text) {
  message m;
  m.kind = static_cast<std::int32_t>(kind);
  m.origin = origin;
  const std::size_t n = std::min(text.size(), sizeof m.text);
  std::memcpy(m.text, text.data(), n);
  m.length = static_cast<std::int32_t>(n);
  return m;
}

void wake_watchdog() {
  state& s = S();
  std::lock_guard lock(s.wd_mutex);
  s.wd_wake.notify_all();
}

// Records the failure (the first one only); true if it was the first.
bool mark_broken(notice kind, int origin, std::string_view text) {
  state& s = S();
  bool expected = false;
  if (!s.broken.compare_exchange_strong(expected, true)) return false;
  {
    std::lock_guard lock(s.text_mutex);
    s.first_error.assign(text);
    s.first_origin = origin;
    s.first_kind = kind;
  }
  s.broken_at.store(now_ns());
  wake_watchdog();
  return true;
}

void handle(const message& m) {
  state& s = S();
  if (m.magic != notice_magic || m.origin < 0 || m.origin >= s.size) return;
  const auto len = static_cast<std::size_t>(std::clamp<std::int32_t>(m.length, 0, sizeof m.text));
  const std::string_view text(m.text, len);
  switch (static_cast<notice>(m.kind)) {
    case notice::left: {
      std::int64_t zero = 0;
      if (s.left_at[static_cast<std::size_t>(m.origin)].compare_exchange_strong(zero, now_ns())) {
        s.left_count.fetch_add(1);
      }
      break;
    }
    case notice::failed:
    case notice::mismatch:
      // Every rank writes its flight recorder as soon as it learns that the
      // job broke (before the stack unwinds and the job is aborted).
      if (mark_broken(static_cast<notice>(m.kind), m.origin, text)) {
        detail::flight_dump_on_failure(text);
      }
      break;
  }
}

// Takes every notice that arrived. Only one thread polls at a time; the
// others go on (they will look again at their next check).
void poll() {
  state& s = S();
  if (!s.active.load(std::memory_order_acquire)) return;
  std::unique_lock lock(s.poll_mutex, std::try_to_lock);
  if (!lock.owns_lock() || s.recv == MPI_REQUEST_NULL) return;
  for (;;) {
    int flag = 0;
    if (MPI_Test(&s.recv, &flag, MPI_STATUS_IGNORE) != MPI_SUCCESS || !flag) return;
    handle(s.inbox);
    s.recv = MPI_REQUEST_NULL;
    if (MPI_Irecv(&s.inbox, sizeof s.inbox, MPI_BYTE, MPI_ANY_SOURCE, notice_tag, s.ctrl,
                  &s.recv) != MPI_SUCCESS) {
      s.recv = MPI_REQUEST_NULL;
      return;
    }
  }
}

std::string describe_failure() {
  state& s = S();
  std::lock_guard lock(s.text_mutex);
  return s.first_error;
}

[[noreturn]] void end_job(std::string_view why) noexcept {
  state& s = S();
  std::fprintf(stderr, "[ringflow error] rank %d ends the MPI job: %.*s\n", s.rank,
               static_cast<int>(why.size()), why.data());
  std::fflush(stderr);
  MPI_Abort(MPI_COMM_WORLD, 1);
  std::_Exit(1);
}

void watchdog_loop() {
  state& s = S();
  std::unique_lock lock(s.wd_mutex);
  while (!s.wd_stop) {
    s.wd_wake.wait_for(lock, std::chrono::milliseconds(100));
    if (s.wd_stop) break;
    lock.unlock();
    if (s.multiple) poll();  // hear notices while the program computes
    if (s.broken.load() && abort_policy.load()) {
      const auto since = std::chrono::nanoseconds(now_ns() - s.broken_at.load());
      if (since >= abort_grace) {
        end_job(
            fmt::format("{} s after the failure the program is still running, so ringflow "
                        "ends the job: {}",
                        abort_grace.count(), describe_failure()));
      }
    }
    lock.lock();
  }
}

}  // namespace

void start() {
  state& s = S();
  if (s.active.load()) return;
  MPI_Comm_rank(MPI_COMM_WORLD, &s.rank);
  MPI_Comm_size(MPI_COMM_WORLD, &s.size);
  detail::flight_set_process_rank(s.rank);
  int provided = MPI_THREAD_SINGLE;
  MPI_Query_thread(&provided);
  s.multiple = provided >= MPI_THREAD_MULTIPLE;
  if (MPI_Comm_dup(MPI_COMM_WORLD, &s.ctrl) != MPI_SUCCESS) {
    log::warn(
        "mpi: could not create the control channel; failures on one rank will reach the "
        "others only through their timeouts");
    return;
  }
  MPI_Comm_set_errhandler(s.ctrl, MPI_ERRORS_RETURN);
  s.left_at = std::make_unique<std::atomic<std::int64_t>[]>(static_cast<std::size_t>(s.size));
  if (MPI_Irecv(&s.inbox, sizeof s.inbox, MPI_BYTE, MPI_ANY_SOURCE, notice_tag, s.ctrl, &s.recv) !=
      MPI_SUCCESS) {
    s.recv = MPI_REQUEST_NULL;
  }
  s.wd_stop = false;
  s.active.store(true, std::memory_order_release);
  s.watchdog = std::thread(watchdog_loop);
}

void finish() noexcept {
  state& s = S();
  if (!s.active.load()) return;
  if (s.broken.load() && abort_policy.load()) {
    end_job(
        fmt::format("the job failed, so MPI_Finalize would wait forever for the ranks that "
                    "are stuck: {}",
                    describe_failure()));
  }
  // Finish in agreement: tell every rank this one is done, then wait until
  // every other rank has said the same (or the job breaks) before
  // MPI_Finalize. OpenMPI's finalize is a fence over all ranks anyway, so a
  // job that finishes normally waits no longer than before; but a rank that
  // sits in that fence while others abort can leave mpirun itself hung in
  // its PMIx server teardown (OpenMPI 4.1.4, Debian 12: 2-7 runs in 20 of
  // tests/fault's skip case), and here the rank instead hears the failure
  // and ends the job as the others do.
  broadcast_notice(make_message(notice::left, s.rank, "finished"));
  for (int spins = 0; s.recv != MPI_REQUEST_NULL; ++spins) {  // no channel: cannot hear them
    poll();
    if (s.broken.load() && abort_policy.load()) {
      end_job(fmt::format("the job failed after this rank finished its collectives: {}",
                          describe_failure()));
    }
    if (s.left_count.load() >= s.size - 1) break;
    if (spins > 100) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  {
    std::lock_guard lock(s.wd_mutex);
    s.wd_stop = true;
    s.wd_wake.notify_all();
  }
  if (s.watchdog.joinable()) s.watchdog.join();
  std::lock_guard lock(s.poll_mutex);
  if (s.recv != MPI_REQUEST_NULL) {
    MPI_Cancel(&s.recv);
    MPI_Wait(&s.recv, MPI_STATUS_IGNORE);
  }
  s.active.store(false);
}

void fail(notice kind, std::string_view text) noexcept {
  if (!abort_policy.load()) return;
  state& s = S();
  try {
    if (!mark_broken(kind, s.rank, text)) return;
    if (s.active.load()) broadcast_notice(make_message(kind, s.rank, text));
    detail::flight_dump_on_failure(text);  // after telling the others
  } catch (...) {
    // Out of memory while formatting: the watchdog still ends the job.
  }
}

bool broken() noexcept { return S().broken.load(std::memory_order_relaxed); }

namespace {
[[noreturn]] void throw_broken(int self, std::string_view what) {
  state& s = S();
  std::string text;
  int origin;
  notice kind;
  {
    std::lock_guard lock(s.text_mutex);
    text = s.first_error;
    origin = s.first_origin;
    kind = s.first_kind;
  }
  const std::string msg =
      origin == s.rank
          ? fmt::format("rank {}: {} abandoned: this job already failed here: {}", self, what, text)
          : fmt::format("rank {}: {} abandoned because the job failed on rank {}: {}", self, what,
                        origin, text);
  if (kind == notice::mismatch) throw usage_error(msg);
  throw comm_error(msg);
}
}  // namespace

void check_peer(int world_peer, int self, std::string_view what) {
  state& s = S();
  if (!s.active.load(std::memory_order_relaxed)) return;
  poll();
  if (s.broken.load(std::memory_order_relaxed) && abort_policy.load()) throw_broken(self, what);
  if (s.left_count.load(std::memory_order_relaxed) == 0) return;
  if (world_peer < 0 || world_peer >= s.size) return;
  const std::int64_t left = s.left_at[static_cast<std::size_t>(world_peer)].load();
  if (left == 0 || std::chrono::nanoseconds(now_ns() - left) < left_grace) return;
  const std::string msg = fmt::format(
      "rank {}: {} cannot complete: world rank {} has left the job (its program finished or "
      "returned from main, having run fewer collectives than this rank); did it fail, or take "
      "another path through the program?",
      self, what, world_peer);
  fail(notice::failed, msg);
  throw comm_error(msg);
}

void check_members(const std::vector<int>& members, int self, std::string_view what) {
  state& s = S();
  if (!s.active.load(std::memory_order_relaxed)) return;
  poll();
  if (s.broken.load(std::memory_order_relaxed) && abort_policy.load()) throw_broken(self, what);
  if (s.left_count.load(std::memory_order_relaxed) == 0) return;
  for (int m : members) {
    if (m != s.rank) check_peer(m, self, what);
  }
}

std::vector<int> world_ranks(MPI_Comm comm) {
  int n = 0;
  MPI_Comm_size(comm, &n);
  std::vector<int> mine(static_cast<std::size_t>(n)), world(static_cast<std::size_t>(n), -1);
  for (int i = 0; i < n; ++i) mine[static_cast<std::size_t>(i)] = i;
  MPI_Group g = MPI_GROUP_NULL, w = MPI_GROUP_NULL;
  if (MPI_Comm_group(comm, &g) == MPI_SUCCESS &&
      MPI_Comm_group(MPI_COMM_WORLD, &w) == MPI_SUCCESS) {
    MPI_Group_translate_ranks(g, n, mine.data(), w, world.data());
  }
  if (g != MPI_GROUP_NULL) MPI_Group_free(&g);
  if (w != MPI_GROUP_NULL) MPI_Group_free(&w);
  return world;
}

}  // namespace job

void set_abort_on_failure(bool on) noexcept { job::abort_policy.store(on); }
bool abort_on_failure() noexcept { return job::abort_policy.load(); }

}  // namespace ringflow::mpi
