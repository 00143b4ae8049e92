// MPI backend: nonblocking point-to-point on a duplicated communicator with
// MPI_ERRORS_RETURN; errors become mpi_error (a comm_error with MPI's code)
// naming the call, rank and peer.
#include "ringflow/backends/mpi.hpp"

#include <fmt/format.h>
#include <mpi.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "core/cpus.hpp"
#include "mpi_check.hpp"
#include "mpi_job.hpp"
#include "ringflow/backends/mpi_interop.hpp"
#include "ringflow/backends/shm.hpp"
#include "ringflow/core/env.hpp"
#include "ringflow/core/error.hpp"
#include "ringflow/core/log.hpp"
#include "waiting.hpp"

namespace ringflow::mpi {
namespace {

using detail::mpi_error_text;

// Where a checked call ran, for RINGFLOW_CHECK_MPI (mpi_check.hpp).
std::string on_rank(int rank, int peer) {
  return peer >= 0 ? fmt::format("on rank {} (peer {})", rank, peer)
                   : fmt::format("on rank {}", rank);
}

}  // namespace

namespace waiting {
namespace {
std::atomic<int> caller_yields{-1};  // -1: not decided yet
std::atomic<int> progress_yields{-1};
occupancy decided;
std::once_flag decided_once;
}  // namespace

occupancy probe(MPI_Comm comm) {
  std::call_once(decided_once, [comm] {
    // Cores = the union of the CPUs the node's ranks may run on: bind-to-core
    // gives each rank one CPU but the ranks still have one each, while
    // taskset or a container limits the union below the machine's count.
    const detail::cpu_mask mine = detail::process_cpus();
    occupancy o;
    o.cores = mine.count();
    MPI_Comm node = MPI_COMM_NULL;
    if (MPI_Comm_split_type(comm, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &node) == MPI_SUCCESS) {
      MPI_Comm_size(node, &o.local_ranks);
      std::vector<detail::cpu_mask> all(static_cast<std::size_t>(o.local_ranks));
      if (MPI_Allgather(&mine, sizeof mine, MPI_BYTE, all.data(), sizeof mine, MPI_BYTE, node) ==
          MPI_SUCCESS) {
        detail::cpu_mask either;
        for (const auto& s : all) either.merge(s);
        o.cores = either.count();
      }
      MPI_Comm_free(&node);
    }
    decided = o;
    int caller = o.local_ranks > o.cores ? 1 : 0;
    int progress = 2 * o.local_ranks > o.cores ? 1 : 0;
    // A switch overrides both; a malformed value warns and keeps the choice above.
    if (const auto v = env::text("RINGFLOW_YIELD")) {
      if (const auto on = env::parse_switch(*v)) {
        caller = progress = *on ? 1 : 0;
      } else {
        env::report(env::malformed::warn, "RINGFLOW_YIELD", *v, "not a switch", env::switch_words,
                    "the automatic choice");
      }
    }
    caller_yields.store(caller);
    progress_yields.store(progress);
    log::debug(
        "mpi: {} ranks on this node, {} cores: callers {}, progress threads {} while "
        "waiting",
        o.local_ranks, o.cores, caller ? "yield" : "spin", progress ? "yield" : "spin");
  });
  return decided;
}

bool yield_caller() noexcept { return caller_yields.load(std::memory_order_relaxed) == 1; }
bool yield_progress() noexcept { return progress_yields.load(std::memory_order_relaxed) == 1; }
}  // namespace waiting

namespace {

// Messages larger than INT_MAX bytes go out as several MPI messages.
constexpr std::size_t max_piece = std::size_t{1} << 30;

class mpi_transport;

// Stamp mode: a wait on a collective message that has made no progress for
// this long asks its peer what it ran (the answer comes back as a mismatch
// error, or not at all). It catches mismatches whose messages never cross,
// e.g. a rank that called with count 0 and so sent nothing.
constexpr std::chrono::milliseconds stall_probe_after{1000};

// Stall probes of a transport: sending one, and comparing the ones that
// arrived with what this rank ran. Defined after mpi_transport.
void send_stall_probe(mpi_transport& t, int peer, const fingerprint& fp);
void answer_stall_probes(mpi_transport& t);

class mpi_request final : public detail::request_state {
 public:
  mpi_request(int rank, int peer, int world_peer, int tag, std::size_t bytes, bool is_send,
              std::chrono::milliseconds timeout)
      : rank_(rank), peer_(peer), world_peer_(world_peer), tag_(tag), bytes_(bytes),
        is_send_(is_send), timeout_(timeout) {}

  // The flight record of the collective this message belongs to: a wait
  // that blocks notes its peer and tag there.
  void watch_flight(detail::flight_record* r) noexcept { flight_ = r; }

  // Lets a stalled wait probe its peer (stamp mode, collective messages).
  void watch_stalls(std::weak_ptr<mpi_transport> owner, const fingerprint& current) {
    owner_ = std::move(owner);
    current_ = current;
  }

  // Posts the message (pieces of at most max_piece bytes). With `stamp`, the
  // first piece starts with a stamp_header: copied together with the data
  // into one buffer when small, sent as its own 32-byte message just before
  // the payload when large (no copy of the payload).
  void post(MPI_Comm comm, void* data, const fingerprint* stamp) {
    auto* p = static_cast<char*>(data);
    std::size_t left = bytes_;
    bool first = true;
    do {  // a zero-byte message is still one message
      const std::size_t n = left < max_piece ? left : max_piece;
      MPI_Request r = MPI_REQUEST_NULL;
      if (first && stamp != nullptr) {
        expected_.push_back(post_stamped(comm, p, n, *stamp, &r));
      } else {
        if (is_send_) {
          RINGFLOW_CHECK_MPI(MPI_Isend(p, static_cast<int>(n), MPI_BYTE, peer_, tag_, comm, &r),
                             on_rank(rank_, peer_));
        } else {
          RINGFLOW_CHECK_MPI(MPI_Irecv(p, static_cast<int>(n), MPI_BYTE, peer_, tag_, comm, &r),
                             on_rank(rank_, peer_));
        }
        expected_.push_back(static_cast<int>(n));
      }
      reqs_.push_back(r);
      p += n;
      left -= n;
      first = false;
    } while (left > 0);
  }

  ~mpi_request() override {
    // Only reached for a request that failed or timed out: free what is left.
    for (auto& r : reqs_) {
      if (r != MPI_REQUEST_NULL) {
        MPI_Cancel(&r);
        MPI_Request_free(&r);
      }
    }
  }

  bool test() override {
    int flag = 0;
    std::vector<MPI_Status> st(reqs_.size());
    check(MPI_Testall(static_cast<int>(reqs_.size()), reqs_.data(), &flag, st.data()), st,
          "MPI_Testall");
    if (flag) verify_sizes(st);
    return flag != 0;
  }

  void wait() override {
    // Poll instead of MPI_Wait so a lost peer becomes timeout_error, not a
    // hang; yield between polls as waiting::should_yield says.
    // Every 1024 polls also look at the job: a rank that failed or left
    // ends this wait at once instead of at the deadline.
    const bool yield = waiting::should_yield();
    const auto started = std::chrono::steady_clock::now();
    const auto deadline = detail::deadline_after(timeout_);
    bool probed = false;
    std::vector<MPI_Status> st(reqs_.size());
    for (unsigned spins = 0;; ++spins) {
      int flag = 0;
      check(MPI_Testall(static_cast<int>(reqs_.size()), reqs_.data(), &flag, st.data()), st,
            "MPI_Testall");
      if (flag) {
        verify_sizes(st);
        return;
      }
      if (spins >= 128) {
        if (spins == 128 && flight_ != nullptr) flight_->note_wait(peer_, tag_);
        if (yield) std::this_thread::yield();
        if ((spins & 1023u) == 0) {
          job::check_peer(world_peer_, rank_, what());
          if (auto owner = owner_.lock()) {
            answer_stall_probes(*owner);
            if (!probed && std::chrono::steady_clock::now() - started > stall_probe_after) {
              send_stall_probe(*owner, peer_, current_);
              probed = true;
            }
          }
          if (std::chrono::steady_clock::now() > deadline) {
            fail<timeout_error>(fmt::format(
                "rank {}: {} did not complete within {} ms (RINGFLOW_TIMEOUT); is rank {} stuck, "
                "dead or calling a different collective?",
                rank_, what(), timeout_.count(), peer_));
          }
        }
      }
    }
  }

 private:
  void check(int rc, const std::vector<MPI_Status>& st, const char* call) {
    if (rc == MPI_SUCCESS) return;
    int code = rc;
    if (rc == MPI_ERR_IN_STATUS) {
      for (const auto& s : st) {
        if (s.MPI_ERROR != MPI_SUCCESS && s.MPI_ERROR != MPI_ERR_PENDING) code = s.MPI_ERROR;
      }
    }
    const int cls = detail::mpi_error_class(code);
    if (cls == MPI_ERR_TRUNCATE) {
      // The buffer holds the start of the message: a differing stamp says more.
      check_stamp(static_cast<int>(sizeof(detail::stamp_header)));
      fail_mpi(code, fmt::format("rank {}: message from rank {} (tag {}) is larger than the {} "
                                 "bytes expected: the ranks disagree on the message size",
                                 rank_, peer_, tag_, bytes_));
    }
    fail_mpi(code, fmt::format("{} failed on rank {} ({} rank {}, tag {}, {} bytes): {}", call,
                               rank_, is_send_ ? "send to" : "receive from", peer_, tag_, bytes_,
                               mpi_error_text(code)));
  }

  // "receive of 4096 bytes from rank 1 (tag 16385)"
  std::string what() const {
    return fmt::format("MPI {} {} bytes {} rank {} (tag {})", is_send_ ? "send of" : "receive of",
                       bytes_, is_send_ ? "to" : "from", peer_, tag_);
  }

  // Throws `msg` as E; a collective's failure breaks the job (job::fail),
  // a user's point-to-point failure is the user's to handle.
  template <class E>
  [[noreturn]] void fail(const std::string& msg) const {
    if (tag_ >= collective_tag_base) job::fail(job::notice::failed, msg);
    throw E(msg);
  }
  // A failed MPI call: mpi_error carries MPI's code (the message is complete).
  [[noreturn]] void fail_mpi(int code, const std::string& msg) const {
    if (tag_ >= collective_tag_base) job::fail(job::notice::failed, msg);
    throw mpi_error(msg, code, detail::mpi_error_class(code));
  }

  void verify_sizes(const std::vector<MPI_Status>& st) {
    if (is_send_) return;
    for (std::size_t i = 0; i < st.size(); ++i) {
      int got = 0;
      MPI_Get_count(&st[i], MPI_BYTE, &got);
      if (i == 0) check_stamp(got);
      if (got != expected_[i]) {
        fail<comm_error>(fmt::format(
            "rank {}: message from rank {} (tag {}) has {} bytes, expected {}: the ranks "
            "disagree on the message size",
            rank_, peer_, tag_, got, expected_[i]));
      }
    }
    if (bounce_ && user_bytes_) {
      std::memcpy(user_, bounce_.get() + sizeof(detail::stamp_header), user_bytes_);
    }
  }

  // Up to this many payload bytes travel copied behind the stamp, in one
  // message; larger ones go as the 32-byte stamp and then the payload as it
  // is, two messages of the same tag, which MPI matches in order. (A
  // two-block derived datatype instead made OpenMPI pack and copy the whole
  // payload, losing its single-copy path: the stamp check cost 1.5-2x at
  // 64 KiB and 1 MiB.) Posts the payload's request into *r and returns its
  // expected size; the separate stamp's request goes into reqs_ first.
  static constexpr std::size_t copy_limit = 4096 - sizeof(detail::stamp_header);

  int post_stamped(MPI_Comm comm, char* p, std::size_t n, const fingerprint& stamp,
                   MPI_Request* r) {
    constexpr std::size_t h = sizeof(detail::stamp_header);
    mine_ = stamp;
    stamped_ = true;
    if (n <= copy_limit) {
      bounce_ = std::make_unique<std::byte[]>(n + h);
      const int len = static_cast<int>(n + h);
      if (is_send_) {
        detail::stamp_header head;
        head.fp = stamp;
        std::memcpy(bounce_.get(), &head, h);
        if (n) std::memcpy(bounce_.get() + h, p, n);
        RINGFLOW_CHECK_MPI(MPI_Isend(bounce_.get(), len, MPI_BYTE, peer_, tag_, comm, r),
                           on_rank(rank_, peer_));
      } else {
        user_ = p;
        user_bytes_ = n;
        RINGFLOW_CHECK_MPI(MPI_Irecv(bounce_.get(), len, MPI_BYTE, peer_, tag_, comm, r),
                           on_rank(rank_, peer_));
      }
      return len;
    }
    if (is_send_) head_.fp = stamp;
    MPI_Request hr = MPI_REQUEST_NULL;
    if (is_send_) {
      RINGFLOW_CHECK_MPI(MPI_Isend(&head_, static_cast<int>(h), MPI_BYTE, peer_, tag_, comm, &hr),
                         on_rank(rank_, peer_));
    } else {
      RINGFLOW_CHECK_MPI(MPI_Irecv(&head_, static_cast<int>(h), MPI_BYTE, peer_, tag_, comm, &hr),
                         on_rank(rank_, peer_));
    }
    reqs_.push_back(hr);
    expected_.push_back(static_cast<int>(h));
    if (is_send_) {
      RINGFLOW_CHECK_MPI(MPI_Isend(p, static_cast<int>(n), MPI_BYTE, peer_, tag_, comm, r),
                         on_rank(rank_, peer_));
    } else {
      RINGFLOW_CHECK_MPI(MPI_Irecv(p, static_cast<int>(n), MPI_BYTE, peer_, tag_, comm, r),
                         on_rank(rank_, peer_));
    }
    return static_cast<int>(n);
  }

  // A received stamp that differs from this rank's is a mismatch between the
  // two ranks' collectives: usage_error here, and the job learns of it.
  void check_stamp(int got) {
    if (!stamped_ || is_send_ || got < static_cast<int>(sizeof(detail::stamp_header))) return;
    detail::stamp_header head;
    std::memcpy(&head, bounce_ ? static_cast<const void*>(bounce_.get()) : &head_, sizeof head);
    std::string msg;
    if (head.magic != detail::stamp_header::magic_value) {
      msg = fmt::format(
          "rank {}: the message from rank {} (tag {}) carries no collective stamp, while this rank "
          "runs {} with stamps: do all ranks use the same RINGFLOW_CHECK / check_mode?",
          rank_, peer_, tag_, mine_.describe());
    } else if (!(head.fp == mine_)) {
      msg = detail::stamp_mismatch_text(rank_, mine_, peer_, head.fp);
    } else {
      return;
    }
    job::fail(job::notice::mismatch, msg);
    throw usage_error(msg);
  }

  std::vector<MPI_Request> reqs_;
  std::vector<int> expected_;
  int rank_, peer_, world_peer_, tag_;
  std::size_t bytes_;
  bool is_send_;
  std::chrono::milliseconds timeout_;
  // Stamped messages (check_mode::stamp): the header, or a buffer holding
  // header + payload for small ones, and where a received payload goes.
  bool stamped_ = false;
  fingerprint mine_;
  std::weak_ptr<mpi_transport> owner_;       // set by watch_stalls
  detail::flight_record* flight_ = nullptr;  // set by watch_flight
  fingerprint current_;
  detail::stamp_header head_;
  std::unique_ptr<std::byte[]> bounce_;
  void* user_ = nullptr;
  std::size_t user_bytes_ = 0;
};

class mpi_transport final : public transport, public std::enable_shared_from_this<mpi_transport> {
 public:
  // Takes ownership of `comm` (a communicator ringflow created by dup/split).
  explicit mpi_transport(MPI_Comm comm) : comm_(comm) {
    // The shared-memory allreduce serves MPI communicators: it registers
    // itself with coll/ (algo::shm) when the first one is made.
    detail::shm_register();
    MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN);
    MPI_Comm_rank(comm_, &rank_);
    MPI_Comm_size(comm_, &size_);
    world_ranks_ = job::world_ranks(comm_);
    // Flight-recorder id: the members' world ranks (split children derive
    // theirs in communicator::split).
    std::uint64_t id = 0x6d7069ull;
    for (int w : world_ranks_) id = detail::flight_mix(id, static_cast<std::uint64_t>(w));
    set_flight_id(id);
  }
  ~mpi_transport() override {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (!finalized && comm_ != MPI_COMM_NULL) MPI_Comm_free(&comm_);
  }

  int rank() const noexcept override { return rank_; }
  int size() const noexcept override { return size_; }
  std::string_view name() const noexcept override { return "mpi"; }
  MPI_Comm handle() const noexcept { return comm_; }

  request isend(const void* data, std::size_t bytes, int peer, int tag) override {
    return post(const_cast<void*>(data), bytes, peer, tag, true);
  }
  request irecv(void* data, std::size_t bytes, int peer, int tag) override {
    return post(data, bytes, peer, tag, false);
  }

  std::shared_ptr<transport> split(int color, int key) override {
    MPI_Comm out = MPI_COMM_NULL;
    RINGFLOW_CHECK_MPI(MPI_Comm_split(comm_, color < 0 ? MPI_UNDEFINED : color, key, &out),
                       on_rank(rank_, -1));
    if (out == MPI_COMM_NULL) return nullptr;
    auto t = std::make_shared<mpi_transport>(out);
    t->set_timeout(timeout());
    return t;
  }

  bool processes_can_share_memory() const noexcept override { return true; }
  bool concurrent_use_ok() const noexcept override {
    int provided = MPI_THREAD_SINGLE;
    MPI_Query_thread(&provided);
    return provided >= MPI_THREAD_MULTIPLE;
  }

  bool native_allreduce(const void* in, void* out, std::size_t count, dtype type,
                        op_kind op) override {
    MPI_Datatype mt;
    switch (type) {
      case dtype::f32: mt = MPI_FLOAT; break;
      case dtype::f64: mt = MPI_DOUBLE; break;
      case dtype::i8: mt = MPI_INT8_T; break;
      case dtype::u8: mt = MPI_UINT8_T; break;
      case dtype::i32: mt = MPI_INT32_T; break;
      case dtype::i64: mt = MPI_INT64_T; break;
      default: return false;  // MPI has no fp16/bf16
    }
    MPI_Op mo;
    switch (op) {
      case op_kind::sum:
      case op_kind::avg: mo = MPI_SUM; break;
      case op_kind::prod: mo = MPI_PROD; break;
      case op_kind::min: mo = MPI_MIN; break;
      case op_kind::max: mo = MPI_MAX; break;
      default: return false;
    }
    if (count > static_cast<std::size_t>(INT_MAX)) return false;
    const void* send = (in == out) ? MPI_IN_PLACE : in;
    // MPI_Iallreduce polled like every other wait, so the native path has a
    // deadline and hears of failed ranks too. A timed-out MPI collective
    // cannot be cancelled: the job is broken then (job::fail).
    const bool yield = waiting::should_yield();
    const auto deadline = detail::deadline_after(timeout());
    const auto what = [&] {
      return fmt::format("MPI_Allreduce (native) of {} {} {}", count, dtype_name(type),
                         op_name(op));
    };
    const auto wait = [&](MPI_Request& req) {
      for (unsigned spins = 0;; ++spins) {
        int flag = 0;
        const int rc = MPI_Test(&req, &flag, MPI_STATUS_IGNORE);
        if (rc != MPI_SUCCESS) {
          const std::string msg =
              fmt::format("MPI_Iallreduce failed on rank {}: {}", rank_, mpi_error_text(rc));
          job::fail(job::notice::failed, msg);
          throw mpi_error(msg, rc, detail::mpi_error_class(rc));
        }
        if (flag) return;
        if (spins < 128) continue;
        if (spins == 128) {
          // -1: the native collective waits on every rank at once.
          if (detail::flight_record* fr = flight_current()) fr->note_wait(-1, -1);
        }
        if (yield) std::this_thread::yield();
        if ((spins & 1023u) != 0) continue;
        job::check_members(world_ranks_, rank_, what());
        if (std::chrono::steady_clock::now() > deadline) {
          const std::string msg = fmt::format(
              "rank {}: {} did not complete within {} ms (RINGFLOW_TIMEOUT); is a rank stuck, "
              "dead or calling a different collective?",
              rank_, what(), timeout().count());
          job::fail(job::notice::failed, msg);
          throw timeout_error(msg);
        }
      }
    };
    // Stamp mode: MPI_Allreduce carries no stamp, so a 16-byte MPI_Iallreduce
    // (max of h and ~h for a hash h of the fingerprint: both come back as
    // this rank's own exactly when every rank's is the same) runs first. It
    // must complete before the data is posted: MPI collectives with
    // different counts or types are undefined behaviour (OpenMPI's libnbc
    // writes past its buffers), so the check costs one small allreduce's
    // latency here. algo::automatic never picks native; RINGFLOW_CHECK=0
    // drops the check.
    if (const fingerprint* stamp = current_stamp(collective_tag_base + 1)) {
      std::uint64_t h = 1469598103934665603ull;  // FNV-1a over the fingerprint's bytes
      const auto* b = reinterpret_cast<const unsigned char*>(stamp);
      for (std::size_t i = 0; i < sizeof(fingerprint); ++i) h = (h ^ b[i]) * 1099511628211ull;
      long long check_in[2] = {static_cast<long long>(h), ~static_cast<long long>(h)};
      long long check_out[2] = {0, 0};
      MPI_Request check_req = MPI_REQUEST_NULL;
      RINGFLOW_CHECK_MPI(
          MPI_Iallreduce(check_in, check_out, 2, MPI_LONG_LONG, MPI_MAX, comm_, &check_req),
          on_rank(rank_, -1));
      wait(check_req);
      if (check_out[0] != check_in[0] || check_out[1] != check_in[1]) {
        const std::string msg = fmt::format(
            "collective mismatch detected on rank {}: the ranks called the native "
            "MPI_Allreduce with different collectives; this rank called {} (RINGFLOW_CHECK=full "
            "names every rank's call)",
            rank_, stamp->describe());
        job::fail(job::notice::mismatch, msg);
        throw usage_error(msg);
      }
    }
    MPI_Request req = MPI_REQUEST_NULL;
    RINGFLOW_CHECK_MPI(MPI_Iallreduce(send, out, static_cast<int>(count), mt, mo, comm_, &req),
                       on_rank(rank_, -1));
    wait(req);
    return true;
  }

 private:
  request post(void* data, std::size_t bytes, int peer, int tag, bool is_send) {
    const fingerprint* stamp = is_send ? stamp_for_send(peer, tag) : stamp_for_receive(peer, tag);
    auto r = std::make_unique<mpi_request>(rank_, peer, world_rank_of(peer), tag, bytes, is_send,
                                           timeout());
    if (const fingerprint* now = current_stamp(tag)) r->watch_stalls(weak_from_this(), *now);
    r->watch_flight(flight_current());
    r->post(comm_, data, stamp);
    return request(std::move(r));
  }

  void answer_peers() override { answer_stall_probes(*this); }

  friend void send_stall_probe(mpi_transport& t, int peer, const fingerprint& fp);
  friend void answer_stall_probes(mpi_transport& t);

  int world_rank_of(int peer) const {
    return peer >= 0 && peer < size_ ? world_ranks_[static_cast<std::size_t>(peer)] : -1;
  }

  MPI_Comm comm_;
  int rank_ = 0;
  int size_ = 1;
  std::vector<int> world_ranks_;  // of each rank of comm_ (the job's notices use world ranks)
  std::deque<detail::stamp_header> probes_sent_;  // buffers of probes in flight (a few at most)
};

void send_stall_probe(mpi_transport& t, int peer, const fingerprint& fp) {
  t.probes_sent_.emplace_back();
  t.probes_sent_.back().fp = fp;
  MPI_Request r = MPI_REQUEST_NULL;
  if (MPI_Isend(&t.probes_sent_.back(), sizeof(detail::stamp_header), MPI_BYTE, peer,
                stall_probe_tag, t.comm_, &r) == MPI_SUCCESS) {
    MPI_Request_free(&r);  // 32 bytes leave at once; the buffer lives as long as t
  }
}

void answer_stall_probes(mpi_transport& t) {
  for (;;) {
    int flag = 0;
    MPI_Status st;
    if (MPI_Iprobe(MPI_ANY_SOURCE, stall_probe_tag, t.comm_, &flag, &st) != MPI_SUCCESS || !flag) {
      return;
    }
    detail::stamp_header head;
    if (MPI_Recv(&head, sizeof head, MPI_BYTE, st.MPI_SOURCE, stall_probe_tag, t.comm_,
                 MPI_STATUS_IGNORE) != MPI_SUCCESS ||
        head.magic != detail::stamp_header::magic_value) {
      continue;
    }
    // Only a collective this rank has run can be compared; a peer ahead of
    // this rank is waiting for it and hears back when it gets there.
    const fingerprint* mine = t.stamp_of(head.fp.sequence);
    if (mine == nullptr || *mine == head.fp) continue;
    const std::string msg = detail::stamp_mismatch_text(t.rank_, *mine, st.MPI_SOURCE, head.fp);
    job::fail(job::notice::mismatch, msg);
    throw usage_error(msg);
  }
}

constexpr int to_mpi(threading t) {
  switch (t) {
    case threading::single: return MPI_THREAD_SINGLE;
    case threading::funneled: return MPI_THREAD_FUNNELED;
    case threading::serialized: return MPI_THREAD_SERIALIZED;
    case threading::multiple: return MPI_THREAD_MULTIPLE;
  }
  return MPI_THREAD_FUNNELED;
}

threading from_mpi(int t) {
  if (t >= MPI_THREAD_MULTIPLE) return threading::multiple;
  if (t >= MPI_THREAD_SERIALIZED) return threading::serialized;
  if (t >= MPI_THREAD_FUNNELED) return threading::funneled;
  return threading::single;
}

std::terminate_handler previous_terminate = nullptr;

void abort_on_terminate() {
  std::string what = "unknown exception";
  if (auto e = std::current_exception()) {
    try {
      std::rethrow_exception(e);
    } catch (const std::exception& ex) {
      what = ex.what();
    } catch (...) {}
  } else {
    what = "std::terminate called";
  }
  abort(1, what);
}

}  // namespace

void environment::init(int* argc, char*** argv, threading level) {
  int already = 0;
  MPI_Initialized(&already);
  if (already) {
    int provided = 0;
    MPI_Query_thread(&provided);
    provided_ = from_mpi(provided);
    return;
  }
  int provided = 0;
  const int rc = MPI_Init_thread(argc, argv, to_mpi(level), &provided);
  if (rc != MPI_SUCCESS) throw detail::make_mpi_error(rc, "MPI_Init_thread failed");
  owns_ = true;
  provided_ = from_mpi(provided);
  MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
  previous_terminate = std::set_terminate(abort_on_terminate);
  job::start();
}

environment::environment(int& argc, char**& argv, threading level) { init(&argc, &argv, level); }
environment::environment() { init(nullptr, nullptr, threading::multiple); }

environment::~environment() {
  if (!owns_) return;
  std::set_terminate(previous_terminate);
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (finalized) return;
  job::finish();  // aborts a broken job instead of finalizing it
  MPI_Finalize();
}

bool initialized() noexcept {
  int init = 0, fin = 0;
  MPI_Initialized(&init);
  MPI_Finalized(&fin);
  return init && !fin;
}

void abort(int code, std::string_view why) noexcept {
  int rank = -1;
  if (initialized()) MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  std::fprintf(stderr, "[ringflow error] rank %d aborts the MPI job: %.*s\n", rank,
               static_cast<int>(why.size()), why.data());
  std::fflush(stderr);
  detail::flight_dump_on_failure(why);
  if (initialized()) MPI_Abort(MPI_COMM_WORLD, code);
  std::_Exit(code);
}

communicator from_comm(MPI_Comm comm) {
  if (!initialized()) {
    throw usage_error(
        "ringflow::mpi: MPI is not initialized; create a ringflow::mpi::environment "
        "(or call MPI_Init) first");
  }
  MPI_Comm dup = MPI_COMM_NULL;
  const int rc = MPI_Comm_dup(comm, &dup);
  if (rc != MPI_SUCCESS) throw detail::make_mpi_error(rc, "MPI_Comm_dup failed");
  waiting::probe(dup);
  return communicator(std::make_shared<mpi_transport>(dup));
}

communicator world() { return from_comm(MPI_COMM_WORLD); }

MPI_Comm native_handle(const communicator& comm) {
  auto* t = dynamic_cast<mpi_transport*>(&comm.raw());
  if (t == nullptr) {
    throw usage_error(fmt::format("mpi::native_handle: communicator uses the '{}' backend, not mpi",
                                  comm.backend()));
  }
  return t->handle();
}

}  // namespace ringflow::mpi
