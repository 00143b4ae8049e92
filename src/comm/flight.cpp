// The flight recorder: the registry of rings, snapshots, the JSON-lines
// dump, and the SIGTERM/SIGUSR1 handlers (see comm/flight.hpp and
// docs/diagnostics.md for the format).
#include "ringflow/comm/flight.hpp"

#include <fcntl.h>
#include <fmt/format.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <thread>

#include "core/json.hpp"
#include "ringflow/comm/transport.hpp"
#include "ringflow/core/atomic_file.hpp"
#include "ringflow/core/dtype.hpp"
#include "ringflow/core/env.hpp"
#include "ringflow/core/error.hpp"
#include "ringflow/core/log.hpp"
#include "ringflow/core/reduce_op.hpp"

namespace ringflow {
namespace flight {

std::string_view state_name(state s) {
  switch (s) {
    case state::empty: return "empty";
    case state::running: return "running";
    case state::done: return "done";
    case state::failed: return "failed";
  }
  return "unknown";
}

bool enabled() noexcept {
  static const bool value = [] {
    return env::flag("RINGFLOW_FLIGHT", true, env::malformed::warn);
  }();
  return value;
}

std::size_t ring_size() noexcept {
  static const std::size_t value = [] {
    return static_cast<std::size_t>(
        env::integer("RINGFLOW_FLIGHT_SIZE", 256, {1, 65536}, env::malformed::warn));
  }();
  return value;
}

}  // namespace flight

namespace detail {
namespace {

// Destroyed communicators whose records stay dumpable (a failure often
// unwinds the stack, destroying communicators, before the dump is written).
constexpr std::size_t retired_kept = 16;

struct registry {
  std::mutex mutex;
  std::vector<std::shared_ptr<flight_ring>> live;
  std::deque<std::shared_ptr<flight_ring>> retired;
  std::map<std::pair<std::uint64_t, int>, int> instances;  // rings made per (comm id, rank)
  std::mutex dump_mutex;                                   // one dump at a time
};

registry& R() {
  static registry* r = new registry;  // never destroyed: dumps may run during exit
  return *r;
}

std::atomic<int> process_rank{-1};

std::int64_t wall_ns() noexcept {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

// Ticks -> wall-clock ns: a reference pair taken when the first ring is
// made, and another at each snapshot (at least 10 ms apart, so the rate is
// good to a few parts per million).
struct clock_pair {
  std::int64_t ticks, wall;
};
clock_pair origin{0, 0};
std::once_flag origin_once;

void take_origin() {
  std::call_once(origin_once, [] { origin = {flight_ticks(), wall_ns()}; });
}

struct tick_converter {
  clock_pair now;
  double ns_per_tick = 1.0;
  tick_converter() {
    take_origin();
    now = {flight_ticks(), wall_ns()};
    while (now.wall - origin.wall < 10'000'000) {
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
      now = {flight_ticks(), wall_ns()};
    }
    if (now.ticks > origin.ticks) {
      ns_per_tick = static_cast<double>(now.wall - origin.wall) /
                    static_cast<double>(now.ticks - origin.ticks);
    }
  }
  std::int64_t wall(std::int64_t ticks) const {
    if (ticks == 0) return 0;
    return now.wall -
           static_cast<std::int64_t>(static_cast<double>(now.ticks - ticks) * ns_per_tick);
  }
};

// SIGTERM / SIGUSR1: the handler writes the signal number into a pipe; a
// thread reads it, dumps, and for SIGTERM then restores the previous
// disposition and raises the signal again.
int signal_pipe[2] = {-1, -1};
struct sigaction previous_term, previous_usr1;
std::once_flag signals_once;
// Set when static destruction begins (by an object made after the ones the
// dump uses): a signal then ends the process without a dump.
std::atomic<bool> exiting{false};
struct exit_guard {
  ~exit_guard() { exiting.store(true); }
};

extern "C" void on_flight_signal(int signo) {
  const int saved = errno;
  const unsigned char b = static_cast<unsigned char>(signo);
  if (signal_pipe[1] >= 0) {
    [[maybe_unused]] const ssize_t n = ::write(signal_pipe[1], &b, 1);
  }
  errno = saved;
}

// `label` says why in the log line; the file's header gets all of `reason`
// (the log line does not repeat the error text, which is printed anyway).
void dump_now(std::string_view reason, std::string_view label) noexcept {
  try {
    const std::string path = flight::dump(reason);
    log::warn("flight recorder: wrote {} ({}); read all ranks' dumps with ringflow-doctor {}", path,
              label, flight::directory());
  } catch (const std::exception& e) {
    log::warn("flight recorder: no dump after {}: {}", label, e.what());
  }
}

void signal_loop() {
  for (;;) {
    unsigned char b = 0;
    const ssize_t n = ::read(signal_pipe[0], &b, 1);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return;
    if (b == SIGUSR1) {
      if (!exiting.load()) dump_now("SIGUSR1", "SIGUSR1");
      continue;
    }
    if (b == SIGTERM) {
      if (!exiting.load()) dump_now("SIGTERM", "SIGTERM");
      ::sigaction(SIGTERM, &previous_term, nullptr);
      ::raise(SIGTERM);
      return;
    }
  }
}

void install_signals() {
  if (!env::flag("RINGFLOW_FLIGHT_SIGNALS", true, env::malformed::warn)) return;
  if (::pipe2(signal_pipe, O_CLOEXEC) != 0) return;
  static exit_guard guard;
  struct sigaction sa {};
  sa.sa_handler = on_flight_signal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;
  // Only replace the defaults: a program (or MPI) with a handler of its own
  // keeps it, and SIGUSR1 then does not dump (flight::dump() still does).
  struct sigaction old {};
  if (::sigaction(SIGTERM, nullptr, &old) == 0 && old.sa_handler == SIG_DFL &&
      !(old.sa_flags & SA_SIGINFO)) {
    ::sigaction(SIGTERM, &sa, &previous_term);
  }
  if (::sigaction(SIGUSR1, nullptr, &old) == 0 && old.sa_handler == SIG_DFL &&
      !(old.sa_flags & SA_SIGINFO)) {
    ::sigaction(SIGUSR1, &sa, &previous_usr1);
  }
  std::thread(signal_loop).detach();
}

void ensure_signals() {
  std::call_once(signals_once, [] {
    try {
      install_signals();
    } catch (...) {
      // No thread: dumps still happen on failures and on request.
    }
  });
}

void append_escaped(std::string& out, std::string_view s) { out += detail::json::quote(s); }

std::string rank_label() {
  const int r = process_rank.load();
  if (r >= 0) return std::to_string(r);
  return fmt::format("pid{}", static_cast<long>(::getpid()));
}

std::string render(std::string_view reason) {
  std::vector<std::shared_ptr<flight_ring>> rings;
  {
    std::lock_guard lock(R().mutex);
    rings.assign(R().retired.begin(), R().retired.end());
    rings.insert(rings.end(), R().live.begin(), R().live.end());
  }
  std::sort(rings.begin(), rings.end(), [](const auto& a, const auto& b) {
    return a->comm_id() != b->comm_id() ? a->comm_id() < b->comm_id() : a->instance < b->instance;
  });
  char host[256] = {};
  if (::gethostname(host, sizeof host - 1) != 0) std::strcpy(host, "unknown");
  std::string out;
  out += fmt::format(
      R"({{"type":"header","format":"ringflow-flight","version":1,"process_rank":{},"pid":{},"host":)",
      process_rank.load(), static_cast<long>(::getpid()));
  append_escaped(out, host);
  out += ",\"reason\":";
  append_escaped(out, reason);
  out += fmt::format(R"(,"time_ns":{},"ring_size":{},"communicators":{}}})", wall_ns(),
                     flight::ring_size(), rings.size());
  out += '\n';
  for (const auto& ring : rings) {
    const std::string id = fmt::format("{:016x}", ring->comm_id());
    out +=
        fmt::format(R"({{"type":"comm","comm":"{}","instance":{},"rank":{},"size":{},"backend":)",
                    id, ring->instance, ring->rank(), ring->size());
    append_escaped(out, ring->backend());
    out += fmt::format(R"(,"started":{},"retired":{}}})", ring->started(),
                       ring->retired.load() ? "true" : "false");
    out += '\n';
    for (const flight::entry& e : ring->snapshot()) {
      out += fmt::format(
          R"({{"type":"record","comm":"{}","instance":{},"rank":{},"size":{},"seq":{},)"
          R"("kind":"{}","dtype":"{}","op":"{}","count":{},"root":{},"algorithm":"{}",)"
          R"("state":"{}","start_ns":{},"end_ns":{},"wait_peer":{},"wait_tag":{},)"
          R"("wait_since_ns":{}}})",
          id, ring->instance, ring->rank(), ring->size(), e.sequence, coll_name(e.kind),
          dtype_name(e.type), op_name(e.op), e.count, e.root, e.algorithm, flight::state_name(e.st),
          e.start_ns, e.end_ns, e.wait_peer, e.wait_tag, e.wait_since_ns);
      out += '\n';
    }
  }
  return out;
}

// Writes next to `path` and renames, so a reader never sees half a file.
void write_file(const std::string& path, const std::string& text) {
  try {
    write_file_atomically(path, text);
  } catch (const file_write_error& e) {
    throw error(fmt::format("flight recorder: {} (set RINGFLOW_FLIGHT_DIR to a writable directory)",
                            e.what()));
  }
}

}  // namespace

flight_ring::flight_ring(std::size_t slots, std::uint64_t comm_id, int rank, int size,
                         std::string_view backend)
    : slots_(std::make_unique<flight_record[]>(slots)), n_(slots), comm_id_(comm_id), rank_(rank),
      size_(size), backend_(backend) {}

std::vector<flight::entry> flight_ring::snapshot() const {
  const std::uint64_t started = started_.load(std::memory_order_relaxed);
  const std::uint64_t first = started > n_ ? started - n_ : 0;
  std::vector<flight::entry> out;
  out.reserve(static_cast<std::size_t>(started - first));
  for (std::uint64_t seq = first; seq < started; ++seq) {
    const flight_record& r = slots_[seq % n_];
    flight::entry e;
    bool got = false;
    for (int attempt = 0; attempt < 4 && !got; ++attempt) {
      const std::uint32_t v1 = r.version.load(std::memory_order_acquire);
      if (v1 & 1u) continue;
      // Acquire loads keep the version check below after them.
      e.sequence = r.sequence.load(std::memory_order_acquire);
      e.kind = static_cast<coll_kind>(r.kind.load(std::memory_order_acquire));
      e.type = static_cast<dtype>(r.type.load(std::memory_order_acquire));
      e.op = static_cast<op_kind>(r.op.load(std::memory_order_acquire));
      e.count = r.count.load(std::memory_order_acquire);
      e.root = r.root.load(std::memory_order_acquire);
      const char* a = r.algorithm.load(std::memory_order_acquire);
      e.algorithm = a != nullptr ? a : "";
      e.st = static_cast<flight::state>(r.st.load(std::memory_order_acquire));
      e.start_ns = r.start.load(std::memory_order_acquire);
      e.end_ns = r.end.load(std::memory_order_acquire);
      e.wait_peer = r.wait_peer.load(std::memory_order_acquire);
      e.wait_tag = r.wait_tag.load(std::memory_order_acquire);
      e.wait_since_ns = r.wait_since.load(std::memory_order_acquire);
      got = r.version.load(std::memory_order_relaxed) == v1;
    }
    // A slot reused under the reader holds a newer collective: skip it.
    if (got && e.sequence == seq && e.st != flight::state::empty) out.push_back(std::move(e));
  }
  if (!out.empty()) {
    const tick_converter conv;
    for (auto& e : out) {
      e.start_ns = conv.wall(e.start_ns);
      e.end_ns = conv.wall(e.end_ns);
      e.wait_since_ns = conv.wall(e.wait_since_ns);
    }
  }
  return out;
}

std::shared_ptr<flight_ring> make_flight_ring(const transport& t, std::uint64_t comm_id) {
  if (!flight::enabled()) return nullptr;
  take_origin();
  auto ring =
      std::make_shared<flight_ring>(flight::ring_size(), comm_id, t.rank(), t.size(), t.name());
  {
    std::lock_guard lock(R().mutex);
    ring->instance = R().instances[{comm_id, t.rank()}]++;
    R().live.push_back(ring);
  }
  ensure_signals();
  return ring;
}

void retire_flight_ring(const std::shared_ptr<flight_ring>& ring) noexcept {
  try {
    std::lock_guard lock(R().mutex);
    auto& live = R().live;
    const auto it = std::find(live.begin(), live.end(), ring);
    if (it == live.end()) return;
    live.erase(it);
    ring->retired.store(true);
    R().retired.push_back(ring);
    while (R().retired.size() > retired_kept) R().retired.pop_front();
  } catch (...) {}
}

void flight_set_process_rank(int rank) noexcept {
  process_rank.store(rank);
  if (flight::enabled()) ensure_signals();
}

void flight_dump_on_failure(std::string_view reason) noexcept {
  if (!flight::enabled()) return;
  if (process_rank.load() < 0 && !env::is_set("RINGFLOW_FLIGHT_DIR")) return;
  dump_now(reason, "after a failure");
}

}  // namespace detail

namespace flight {

std::vector<entry> recent(const transport& t) {
  const detail::flight_ring* ring = t.flight_ring_if_made();
  return ring != nullptr ? ring->snapshot() : std::vector<entry>{};
}

std::string directory() { return env::text("RINGFLOW_FLIGHT_DIR").value_or("."); }

std::string default_path() {
  return fmt::format("{}/ringflow-flight.{}.jsonl", directory(), detail::rank_label());
}

void dump_to(const std::string& path, std::string_view reason) {
  std::lock_guard lock(detail::R().dump_mutex);
  detail::write_file(path, detail::render(reason));
}

std::string dump(std::string_view reason) {
  std::string path = default_path();
  dump_to(path, reason);
  return path;
}

}  // namespace flight
}  // namespace ringflow
