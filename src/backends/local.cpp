// Local backend: rendezvous message passing between threads.
//
// A send and a receive match on (source, destination, tag) in posting order.
// Whichever side arrives second copies the bytes straight from the sender's
// buffer into the receiver's (one copy, no staging) and completes both.
#include "ringflow/backends/local.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <exception>
#include <map>
#include <mutex>
#include <thread>
#include <tuple>

#include "ringflow/core/error.hpp"

namespace ringflow::local {
namespace {

struct group;

// Completion record shared by the two sides of one message.
struct completion {
  bool done = false;
  // Matched, and the bytes are being copied outside the lock: neither side
  // may give up (and free its buffer) until `done`, or the copier would read
  // or write freed memory.
  bool copying = false;
  std::string error;      // non-empty: the message failed (size or stamp mismatch)
  bool mismatch = false;  // the error is the two ranks' collectives differing
};

// The collective a message belongs to (check_mode::stamp), if any.
struct stamp_slot {
  bool present = false;
  fingerprint fp;
  static stamp_slot of(const fingerprint* f) {
    stamp_slot s;
    if (f != nullptr) {
      s.present = true;
      s.fp = *f;
    }
    return s;
  }
};

struct posted_send {
  const void* data;
  std::size_t bytes;
  int source;
  int tag;
  std::shared_ptr<completion> state;
  stamp_slot stamp;
};

struct posted_recv {
  void* data;
  std::size_t bytes;
  int source;
  int tag;
  std::shared_ptr<completion> state;
  stamp_slot stamp;
};

// Everything addressed to one rank. Both the receiver (waiting for data) and
// senders (waiting for their message to be taken) wait on its condition.
struct mailbox {
  std::mutex mutex;
  std::condition_variable changed;
  std::deque<posted_send> sends;
  std::deque<posted_recv> recvs;
};

std::atomic<std::uint64_t> group_serial{0};

struct group : std::enable_shared_from_this<group> {
  explicit group(int n)
      : size(n), boxes(static_cast<std::size_t>(n)), finished(static_cast<std::size_t>(n)),
        flight_id(detail::flight_mix(0x6c6f63616cull, group_serial.fetch_add(1))) {}

  const int size;
  std::vector<mailbox> boxes;
  // Ranks whose function returned (local::run): a wait for one of them can
  // never complete, since everything it sent was taken before it returned.
  std::vector<std::atomic<bool>> finished;
  // The flight recorder's id of a group made by make_group/run (split
  // children get theirs from communicator::split).
  const std::uint64_t flight_id;

  // First failure in the group: which rank and why.
  std::atomic<bool> failed{false};
  std::mutex failure_mutex;
  int failed_rank = -1;
  std::string failure;
  bool failure_is_usage = false;

  // split(): children by (split round, color), created by the first arrival.
  std::mutex split_mutex;
  std::map<std::pair<std::uint64_t, int>, std::shared_ptr<group>> children;

  // `usage`: the failing rank's error was a usage_error (a mismatch between
  // the ranks' calls, a bad argument); the others' abandoned waits then throw
  // usage_error too, as on the MPI backend, instead of comm_error.
  void fail(int rank, const std::string& why, bool usage = false) {
    {
      std::lock_guard lock(failure_mutex);
      if (failed_rank < 0) {
        failed_rank = rank;
        failure = why;
        failure_is_usage = usage;
      }
    }
    failed.store(true);
    for (auto& box : boxes) {
      std::lock_guard lock(box.mutex);
      box.changed.notify_all();
    }
    std::lock_guard lock(split_mutex);
    for (auto& [key, child] : children) child->fail(rank, why, usage);
  }

  void finish(int rank) {
    finished[static_cast<std::size_t>(rank)].store(true);
    for (auto& box : boxes) {
      std::lock_guard lock(box.mutex);
      box.changed.notify_all();
    }
  }

  std::string failure_text() {
    std::lock_guard lock(failure_mutex);
    return fmt::format("rank {} failed: {}", failed_rank, failure);
  }
  bool failed_by_usage() {
    std::lock_guard lock(failure_mutex);
    return failure_is_usage;
  }
  // Throws `msg` as the kind of error that failed the group.
  [[noreturn]] void throw_failure(const std::string& msg) {
    if (failed_by_usage()) throw usage_error(msg);
    throw comm_error(msg);
  }
};

// Both sides of a message are here, so the stamps are compared on every
// message, before the sizes (a differing stamp explains a differing size).
bool stamps_differ(const stamp_slot& sent, const stamp_slot& expected, completion& send_state,
                   completion& recv_state, int source, int dest, int tag) {
  if (sent.present == expected.present && (!sent.present || sent.fp == expected.fp)) return false;
  std::string why;
  if (sent.present && expected.present) {
    why = detail::stamp_mismatch_text(dest, expected.fp, source, sent.fp);
  } else {
    why = fmt::format(
        "the message from rank {} to rank {} (tag {}) is stamped on one side only: do all ranks "
        "use "
        "the same check_mode?",
        source, dest, tag);
  }
  send_state.error = recv_state.error = why;
  send_state.mismatch = recv_state.mismatch = true;
  return true;
}

void copy_message(const void* from, std::size_t from_bytes, void* to, std::size_t to_bytes,
                  completion& send_state, completion& recv_state, int source, int dest, int tag) {
  if (from_bytes != to_bytes) {
    const std::string why = fmt::format(
        "message size mismatch from rank {} to rank {} (tag {}): sent {} bytes, receive expects "
        "{} bytes",
        source, dest, tag, from_bytes, to_bytes);
    send_state.error = why;
    recv_state.error = why;
    return;
  }
  if (from_bytes != 0) std::memcpy(to, from, from_bytes);
}

class local_request final : public detail::request_state {
 public:
  local_request(std::shared_ptr<group> g, int box, std::shared_ptr<completion> s, int rank,
                int peer, int tag, std::size_t bytes, bool is_send,
                std::chrono::milliseconds timeout, detail::flight_record* flight)
      : group_(std::move(g)), box_(box), state_(std::move(s)), rank_(rank), peer_(peer), tag_(tag),
        bytes_(bytes), is_send_(is_send), timeout_(timeout), flight_(flight) {}

  bool test() override {
    auto& box = group_->boxes[static_cast<std::size_t>(box_)];
    std::lock_guard lock(box.mutex);
    if (state_->done) {
      rethrow_if_error();
      return true;
    }
    if (state_->copying) return false;
    give_up_if_hopeless(box);
    return false;
  }

  void wait() override {
    auto& box = group_->boxes[static_cast<std::size_t>(box_)];
    std::unique_lock lock(box.mutex);
    const auto deadline = detail::deadline_after(timeout_);
    if (!state_->done && flight_ != nullptr) flight_->note_wait(peer_, tag_);
    while (!state_->done) {
      if (state_->copying) {  // finishes without blocking on anything
        box.changed.wait(lock);
        continue;
      }
      give_up_if_hopeless(box);
      if (box.changed.wait_until(lock, deadline) == std::cv_status::timeout && !state_->done &&
          !state_->copying) {
        withdraw(box);
        if (group_->failed.load()) throw_abandoned();
        const std::string msg = fmt::format(
            "rank {}: {} {} bytes {} rank {} (tag {}) did not complete within {} ms "
            "(RINGFLOW_TIMEOUT); is rank {} stuck or calling a different collective?",
            rank_, is_send_ ? "send of" : "receive of", bytes_, is_send_ ? "to" : "from", peer_,
            tag_, timeout_.count(), peer_);
        lock.unlock();
        if (tag_ >= collective_tag_base) detail::flight_dump_on_failure(msg);
        throw timeout_error(msg);
      }
    }
    rethrow_if_error();
  }

 private:
  // The message is unmatched (not done, not being copied) and can never
  // complete: the group failed, or the peer returned from its function.
  // Throws after withdrawing it; the caller holds box.mutex.
  void give_up_if_hopeless(mailbox& box) const {
    if (group_->failed.load()) {
      withdraw(box);
      throw_abandoned();
    }
    if (group_->finished[static_cast<std::size_t>(peer_)].load()) {
      withdraw(box);
      throw_peer_finished();
    }
  }
  // Giving up on a message that no one has matched yet: take it out of the
  // mailbox (the caller holds box.mutex), so a peer that arrives later cannot
  // match it and copy into or out of a buffer our caller is about to free.
  void withdraw(mailbox& box) const {
    auto mine = [this](const auto& posted) { return posted.state == state_; };
    if (is_send_) {
      std::erase_if(box.sends, mine);
    } else {
      std::erase_if(box.recvs, mine);
    }
  }
  void rethrow_if_error() const {
    if (state_->error.empty()) return;
    if (state_->mismatch) throw usage_error(state_->error);
    throw comm_error(fmt::format("rank {}: {}", rank_, state_->error));
  }
  [[noreturn]] void throw_peer_finished() const {
    throw comm_error(fmt::format(
        "rank {}: {} {} bytes {} rank {} (tag {}) cannot complete: rank {} has returned from its "
        "function, having run fewer collectives than this rank; did it take another path?",
        rank_, is_send_ ? "send of" : "receive of", bytes_, is_send_ ? "to" : "from", peer_, tag_,
        peer_));
  }
  [[noreturn]] void throw_abandoned() const {
    group_->throw_failure(fmt::format("rank {}: {} rank {} (tag {}) abandoned because {}", rank_,
                                      is_send_ ? "send to" : "receive from", peer_, tag_,
                                      group_->failure_text()));
  }

  std::shared_ptr<group> group_;
  int box_;
  std::shared_ptr<completion> state_;
  int rank_, peer_, tag_;
  std::size_t bytes_;
  bool is_send_;
  std::chrono::milliseconds timeout_;
  detail::flight_record* flight_;  // the collective this message belongs to, or null
};

class local_transport final : public transport {
 public:
  local_transport(std::shared_ptr<group> g, int rank) : group_(std::move(g)), rank_(rank) {
    set_flight_id(group_->flight_id);
  }

  int rank() const noexcept override { return rank_; }
  int size() const noexcept override { return group_->size; }
  std::string_view name() const noexcept override { return "local"; }

  request isend(const void* data, std::size_t bytes, int peer, int tag) override {
    check_peer(peer, "isend");
    auto state = std::make_shared<completion>();
    const stamp_slot stamp = stamp_slot::of(current_stamp(tag));
    auto& box = group_->boxes[static_cast<std::size_t>(peer)];
    {
      std::unique_lock lock(box.mutex);
      for (auto it = box.recvs.begin(); it != box.recvs.end(); ++it) {
        if (it->source == rank_ && it->tag == tag) {
          posted_recv r = *it;
          box.recvs.erase(it);
          state->copying = r.state->copying = true;
          lock.unlock();
          // Copy outside the lock; both requests stay pending until done is set.
          if (!stamps_differ(stamp, r.stamp, *state, *r.state, rank_, peer, tag)) {
            copy_message(data, bytes, r.data, r.bytes, *state, *r.state, rank_, peer, tag);
          }
          lock.lock();
          state->done = true;
          r.state->done = true;
          box.changed.notify_all();
          return make_request(peer, state, peer, tag, bytes, true);
        }
      }
      box.sends.push_back({data, bytes, rank_, tag, state, stamp});
      box.changed.notify_all();
    }
    return make_request(peer, state, peer, tag, bytes, true);
  }

  request irecv(void* data, std::size_t bytes, int peer, int tag) override {
    check_peer(peer, "irecv");
    auto state = std::make_shared<completion>();
    const stamp_slot stamp = stamp_slot::of(current_stamp(tag));
    auto& box = group_->boxes[static_cast<std::size_t>(rank_)];
    {
      std::unique_lock lock(box.mutex);
      for (auto it = box.sends.begin(); it != box.sends.end(); ++it) {
        if (it->source == peer && it->tag == tag) {
          posted_send s = *it;
          box.sends.erase(it);
          state->copying = s.state->copying = true;
          lock.unlock();
          if (!stamps_differ(s.stamp, stamp, *s.state, *state, peer, rank_, tag)) {
            copy_message(s.data, s.bytes, data, bytes, *s.state, *state, peer, rank_, tag);
          }
          lock.lock();
          state->done = true;
          s.state->done = true;
          box.changed.notify_all();
          return make_request(rank_, state, peer, tag, bytes, false);
        }
      }
      box.recvs.push_back({data, bytes, peer, tag, state, stamp});
    }
    return make_request(rank_, state, peer, tag, bytes, false);
  }

  std::shared_ptr<transport> split(int color, int key) override;

 private:
  request make_request(int box, std::shared_ptr<completion> s, int peer, int tag, std::size_t bytes,
                       bool is_send) {
    return request(std::make_unique<local_request>(group_, box, std::move(s), rank_, peer, tag,
                                                   bytes, is_send, timeout(), flight_current()));
  }

  void check_peer(int peer, const char* what) const {
    if (peer < 0 || peer >= group_->size) {
      throw usage_error(fmt::format("local {} on rank {}: peer {} outside group of size {}", what,
                                    rank_, peer, group_->size));
    }
    if (group_->failed.load()) {
      group_->throw_failure(
          fmt::format("rank {}: cannot {} rank {}: {}", rank_, what, peer, group_->failure_text()));
    }
  }

  std::shared_ptr<group> group_;
  int rank_;
  std::uint64_t split_round_ = 0;
};

// Split: every rank shares (color, key) with every other through the group
// itself (an all-to-all of 8 bytes), then the ranks of one color meet at a
// child group created by the first of them to arrive.
std::shared_ptr<transport> local_transport::split(int color, int key) {
  const int n = group_->size;
  const int tag = collective_tag_base + 4000;
  std::vector<std::int32_t> mine{color, key};
  std::vector<std::int32_t> all(2 * static_cast<std::size_t>(n));
  std::vector<request> reqs;
  for (int p = 0; p < n; ++p) {
    reqs.push_back(irecv(&all[2 * static_cast<std::size_t>(p)], 8, p, tag));
  }
  for (int p = 0; p < n; ++p) reqs.push_back(isend(mine.data(), 8, p, tag));
  wait_all(reqs);
  const std::uint64_t round = split_round_++;
  if (color < 0) return nullptr;

  std::vector<std::tuple<int, int>> members;  // (key, old rank)
  for (int p = 0; p < n; ++p) {
    if (all[2 * static_cast<std::size_t>(p)] == color) {
      members.emplace_back(all[2 * static_cast<std::size_t>(p) + 1], p);
    }
  }
  std::sort(members.begin(), members.end());
  int new_rank = 0;
  for (std::size_t i = 0; i < members.size(); ++i) {
    if (std::get<1>(members[i]) == rank_) new_rank = static_cast<int>(i);
  }
  std::shared_ptr<group> child;
  {
    std::lock_guard lock(group_->split_mutex);
    auto& slot = group_->children[{round, color}];
    if (!slot) slot = std::make_shared<group>(static_cast<int>(members.size()));
    child = slot;
  }
  auto t = std::make_shared<local_transport>(child, new_rank);
  t->set_timeout(timeout());
  return t;
}

}  // namespace

namespace {
std::vector<communicator> make_group_of(const std::shared_ptr<group>& g) {
  std::vector<communicator> comms;
  comms.reserve(static_cast<std::size_t>(g->size));
  for (int r = 0; r < g->size; ++r) comms.emplace_back(std::make_shared<local_transport>(g, r));
  return comms;
}

std::shared_ptr<group> new_group(int n, const char* who) {
  if (n < 1) throw usage_error(fmt::format("{}: rank count {} must be >= 1", who, n));
  return std::make_shared<group>(n);
}
}  // namespace

std::vector<communicator> make_group(int n) {
  return make_group_of(new_group(n, "local::make_group"));
}

void run(int n, const std::function<void(communicator&)>& fn) {
  auto g = new_group(n, "local::run");
  auto comms = make_group_of(g);
  std::vector<std::exception_ptr> errors(static_cast<std::size_t>(n));
  std::mutex order_mutex;
  std::vector<int> failure_order;
  std::vector<std::thread> threads;
  threads.reserve(static_cast<std::size_t>(n));
  for (int r = 0; r < n; ++r) {
    threads.emplace_back([&, r] {
      try {
        fn(comms[static_cast<std::size_t>(r)]);
        g->finish(r);
      } catch (const std::exception& e) {
        errors[static_cast<std::size_t>(r)] = std::current_exception();
        {
          std::lock_guard lock(order_mutex);
          failure_order.push_back(r);
        }
        g->fail(r, e.what(), dynamic_cast<const usage_error*>(&e) != nullptr);
      } catch (...) {
        errors[static_cast<std::size_t>(r)] = std::current_exception();
        {
          std::lock_guard lock(order_mutex);
          failure_order.push_back(r);
        }
        g->fail(r, "unknown exception");
      }
    });
  }
  for (auto& t : threads) t.join();
  if (!failure_order.empty()) {
    // The group records who failed first; rethrow that rank's own exception.
    int first = g->failed_rank;
    if (first < 0 || !errors[static_cast<std::size_t>(first)]) first = failure_order.front();
    std::rethrow_exception(errors[static_cast<std::size_t>(first)]);
  }
}

}  // namespace ringflow::local
