// A ring memory policy (coll/ring.hpp) for buffers the transport cannot
// reach directly, written once over a small "ops" interface: copies, element
// reductions and ordering markers queued in one in-order stream. The CUDA
// build instantiates it with a CUDA stream (cuda/ring.hpp: the staged MPI
// path and the device-direct ring); tests instantiate it with a host stream
// that runs its queue late, so the ordering rules are checked without a GPU.
//
// Two modes:
//  - staged: buffers are "device" memory, the transport takes host memory.
//    A segment to send is copied into one of `slots` host send blocks, and
//    its send is posted once the copy is done; a received segment lands in
//    one of `slots` host receive slots and is copied to a device slot
//    (reduce-scatter) or to its place in the output (allgather).
//  - direct: the transport takes the buffers' pointers itself. Receives land
//    in device slots (reduce-scatter) or in the output (allgather); a send is
//    posted once the work that wrote its bytes is done.
//
// The one rule that keeps a staged ring alive: the host never blocks on a
// single thing. Every wait polls (pump()): while it waits for a receive, a
// copy or a slot it also posts the sends whose copies are done, frees the
// blocks of completed sends and starts the next copies. And a receive slot
// never waits on a neighbour: it is free once this rank's copy out of it is
// done (see forward()).
//
// Ops interface (one object per call, all queued work in one order):
//   void reserve_blocks(n, bytes)           n host send blocks of `bytes`
//   void reserve_slots(n, bytes, host_too)  n device receive slots (and host ones)
//   std::byte* send_block(i), recv_slot(k), device_slot(k)   that memory
//   void* partial(bytes)                                     device scratch
//   void to_host(dst, src, bytes), to_device(...), on_device(...)  queued copies
//   void reduce(type, op, dst, a, b, n)                      queued dst = op(a, b)
//   void finish(type, dst, n, p)                             queued avg division
//   int mark()           a marker after the work queued so far
//   bool done(marker)    polled: is that work done? (never blocks)
//   void release(marker) the marker may be reused
//   void synchronize()   blocks until all queued work is done
#pragma once

#include <fmt/format.h>

#include <chrono>
#include <cstddef>
#include <deque>
#include <string>
#include <thread>
#include <vector>

#include "ringflow/coll/ring.hpp"
#include "ringflow/comm/transport.hpp"
#include "ringflow/core/dtype.hpp"
#include "ringflow/core/error.hpp"
#include "ringflow/core/reduce_op.hpp"

namespace ringflow::detail {

enum class staging_mode { staged, direct };

template <class Ops>
class staged_ring_memory {
 public:
  /// `segment_bytes`: the bytes of the call's largest segment
  /// (segment_elems(seg, sizeof(T)) * sizeof(T)); `slots` >= 2.
  staged_ring_memory(Ops& ops, transport& t, staging_mode mode, std::size_t segment_bytes,
                     std::size_t slots)
      : ops_(ops), t_(t), mode_(mode), seg_bytes_(std::max<std::size_t>(segment_bytes, 1)),
        nslots_(std::max<std::size_t>(slots, 2)), timeout_(t.timeout()) {
    if (mode_ == staging_mode::staged) {
      ops_.reserve_blocks(nslots_, seg_bytes_);
      for (std::size_t b = nslots_; b-- > 0;) free_blocks_.push_back(static_cast<int>(b));
    }
  }
  staged_ring_memory(const staged_ring_memory&) = delete;
  staged_ring_memory& operator=(const staged_ring_memory&) = delete;

  // --- the memory policy interface of coll/ring.hpp ---
  template <class T>
  void send(transport& /*t*/, const T* src, std::size_t n, int peer, int tag,
            std::vector<request>& sends) {
    send_bytes(src, n * sizeof(T), peer, tag, &sends);
  }

  /// Staged: the sends' copies are queued (later work comes after them).
  /// Direct: the sends have completed.
  void sources_read(std::vector<request>& sends) { sources_read_group(&sends); }
  void sources_read_group(const void* group) {
    if (mode_ == staging_mode::staged) {
      wait_until(
          [&] {
            for (std::size_t i = first_queued_; i < q_.size(); ++i) {
              if (q_[i].group == group) return false;
            }
            return true;
          },
          [] { return std::string("copying the reduce-scatter sends out"); });
    } else {
      wait_until(
          [&] {
            for (const pending& p : q_) {
              if (p.group == group && p.st != state::done) return false;
            }
            return true;
          },
          [] { return std::string("a reduce-scatter send"); });
    }
  }

  void complete(std::vector<request>& sends) {
    wait_all(sends);  // empty: the policy keeps its requests itself
    wait_until([&] { return q_.empty(); },
               [&] {
                 const pending& p = q_.front();
                 return fmt::format("the send of {} bytes to rank {} (tag {})", p.bytes, p.peer,
                                    p.tag);
               });
    for (request& r : recvs_) r.wait();
    for (request& r : gathers_) r.wait();
    ops_.synchronize();
  }

  std::size_t recv_depth() const noexcept { return nslots_; }

  template <class T>
  void open_slots(std::size_t /*depth*/, std::size_t seg) {
    open_slots_bytes(seg * sizeof(T));
  }
  template <class T>
  void post_recv(transport& /*t*/, std::size_t k, std::size_t n, int peer, int tag) {
    post_recv_bytes(k, n * sizeof(T), peer, tag);
  }
  template <class T, class Op>
  void reduce_received(std::size_t k, T* dst, const T* mine, std::size_t n, const Op& /*op*/) {
    reduce_received_elems(k, dtype_of<std::remove_cv_t<T>>, Op::kind, dst, mine, n);
  }
  template <class T, class Op>
  void finish(T* dst, std::size_t n, const Op& /*op*/, int p) {
    if constexpr (Op::kind == op_kind::avg) finish_elems(dtype_of<std::remove_cv_t<T>>, dst, n, p);
  }
  std::size_t gather_depth(std::size_t units) {
    if (mode_ == staging_mode::direct) {
      // Receives land straight in the output: post them all, like the CPU.
      gathers_.resize(units);
      return units;
    }
    if (slot_bytes_ < seg_bytes_) open_slots_bytes(seg_bytes_);  // allgather on its own
    return std::min(units, nslots_);
  }
  template <class T>
  void post_gather(transport& /*t*/, std::size_t k, T* dst, std::size_t n, int peer, int tag) {
    post_gather_bytes(k, dst, n * sizeof(T), peer, tag);
  }
  template <class T>
  void land(std::size_t k, T* dst, std::size_t n) {
    land_bytes(k, dst, n * sizeof(T));
  }
  template <class T>
  void forward(transport& /*t*/, std::size_t /*k*/, const T* dst, std::size_t n, int peer, int tag,
               std::vector<request>& sends) {
    forward_bytes(dst, n * sizeof(T), peer, tag, &sends);
  }
  template <class T>
  void copy(T* dst, const T* src, std::size_t n) {
    ops_.on_device(dst, src, n * sizeof(T));
  }
  template <class T>
  T* partial(std::size_t count) {
    return static_cast<T*>(ops_.partial(count * sizeof(T)));
  }

  // --- the same, type-erased (for wrappers compiled elsewhere) ---
  void send_bytes(const void* src, std::size_t bytes, int peer, int tag, const void* group) {
    pending p;
    p.bytes = bytes;
    p.peer = peer;
    p.tag = tag;
    p.group = group;
    if (mode_ == staging_mode::staged) {
      if (bytes > seg_bytes_) {
        throw usage_error(fmt::format(
            "rank {}: staged ring: a segment of {} bytes does not fit the {}-byte staging "
            "blocks (pass segment_elems x element size as the segment size)",
            rank(), bytes, seg_bytes_));
      }
      p.dev_src = src;
    } else {
      // The work that wrote src must be done before the transport reads it.
      p.src = src;
      p.marker = ops_.mark();
    }
    enqueue(std::move(p));
  }

  void open_slots_bytes(std::size_t bytes) {
    slot_bytes_ = bytes;
    ops_.reserve_slots(nslots_, bytes, mode_ == staging_mode::staged);
    recvs_.resize(nslots_);
    slot_marker_.assign(nslots_, -1);
  }

  void post_recv_bytes(std::size_t k, std::size_t bytes, int peer, int tag) {
    wait_slot_free(k);
    std::byte* into = mode_ == staging_mode::staged ? ops_.recv_slot(k) : ops_.device_slot(k);
    recvs_[k] = t_.irecv(into, bytes, peer, tag);
  }

  void reduce_received_elems(std::size_t k, dtype type, op_kind op, void* dst, const void* mine,
                             std::size_t n) {
    const std::size_t bytes = n * dtype_size(type);
    wait_recv(recvs_[k], bytes);
    if (mode_ == staging_mode::staged)
      ops_.to_device(ops_.device_slot(k), ops_.recv_slot(k), bytes);
    // Same operand order as the CPU's reduce_inplace(dst, mine, received):
    // min/max keep their first operand on ties and NaN payloads.
    ops_.reduce(type, op, dst, mine, ops_.device_slot(k), n);
    mark_slot_read(k);
  }

  void finish_elems(dtype type, void* dst, std::size_t n, int p) { ops_.finish(type, dst, n, p); }

  void post_gather_bytes(std::size_t k, void* dst, std::size_t bytes, int peer, int tag) {
    if (mode_ == staging_mode::direct) {
      gathers_[k] = t_.irecv(dst, bytes, peer, tag);
      return;
    }
    wait_slot_free(k);
    recvs_[k] = t_.irecv(ops_.recv_slot(k), bytes, peer, tag);
  }

  void land_bytes(std::size_t k, void* dst, std::size_t bytes) {
    if (mode_ == staging_mode::direct) {
      wait_recv(gathers_[k], bytes);
      return;
    }
    wait_recv(recvs_[k], bytes);
    ops_.to_device(dst, ops_.recv_slot(k), bytes);
    mark_slot_read(k);
  }

  void forward_bytes(const void* dst, std::size_t bytes, int peer, int tag, const void* group) {
    if (mode_ == staging_mode::staged) {
      // Sent again from its copy in the output, not from the host slot it
      // arrived in: a slot held until its forward completes makes the
      // receive side wait on the neighbour, and with more segments per chunk
      // than slots plus blocks the ring then waits on itself (own-chunk sends
      // go first and fill every block; they need the neighbour's slots,
      // which wait on its own forwards...). Freed once its copy is done, a
      // slot depends on this rank's device only.
      send_bytes(dst, bytes, peer, tag, group);
      return;
    }
    pending p;
    p.src = dst;  // landed by the transport, written by no work of ours
    p.bytes = bytes;
    p.peer = peer;
    p.tag = tag;
    p.group = group;
    enqueue(std::move(p));
  }

 private:
  enum class state { queued, copying, posted, done };
  struct pending {
    const void* dev_src = nullptr;  // staged: bytes still to copy into a block
    const void* src = nullptr;      // what the send reads
    std::size_t bytes = 0;
    int peer = 0;
    int tag = 0;
    const void* group = nullptr;  // the schedule's request vector (sources_read)
    int block = -1;               // staged: send block held until the send completes
    int marker = -1;              // work to wait for before posting (-1: none)
    state st = state::queued;
    request req;
  };

  int rank() const { return t_.rank(); }
  int left() const { return ring_mod(t_.rank() - 1, t_.size()); }

  [[noreturn]] void timed_out(const std::string& what) const {
    throw timeout_error(fmt::format(
        "rank {}: staged ring: {} did not complete within {} ms (RINGFLOW_TIMEOUT); is a "
        "neighbour stuck, dead or calling a different collective?",
        rank(), what, timeout_.count()));
  }

  /// Polls `ready` while pumping the send queue; timeout_error after the
  /// transport's timeout.
  template <class Ready, class What>
  void wait_until(Ready&& ready, What&& what) {
    const auto deadline = deadline_after(timeout_);
    for (unsigned spins = 0;; ++spins) {
      pump();
      if (ready()) return;
      if (spins >= 64) {
        std::this_thread::yield();
        if ((spins & 255u) == 0 && std::chrono::steady_clock::now() > deadline) timed_out(what());
      }
    }
  }

  void release(pending& p) {
    if (p.block >= 0) free_blocks_.push_back(p.block);
    if (p.marker >= 0) ops_.release(p.marker);
    p.block = p.marker = -1;
    p.st = state::done;
  }

  /// One round of progress on the send queue, in queue order (sends to one
  /// peer with one tag must be posted in schedule order).
  void pump() {
    // Completed sends free their blocks. Sends complete about in the order
    // they were posted: testing stops at the first pending one, so a long
    // queue (direct mode, small segments) costs little per round.
    for (std::size_t i = 0; i < first_unposted_; ++i) {
      pending& p = q_[i];
      if (p.st != state::posted) continue;
      if (!p.req.test()) break;
      release(p);
    }
    while (!q_.empty() && q_.front().st == state::done) {
      q_.pop_front();
      --first_unposted_;
      --first_queued_;
    }
    // Copies (or the work that wrote the bytes) done: post, in order.
    while (first_unposted_ < first_queued_) {
      pending& p = q_[first_unposted_];
      if (p.marker >= 0 && !ops_.done(p.marker)) break;
      p.req = t_.isend(p.src, p.bytes, p.peer, p.tag);
      p.st = state::posted;
      ++first_unposted_;
    }
    // Start the copies of queued sends while send blocks are free.
    while (first_queued_ < q_.size()) {
      pending& p = q_[first_queued_];
      if (p.dev_src != nullptr) {
        if (free_blocks_.empty()) break;
        p.block = free_blocks_.back();
        free_blocks_.pop_back();
        std::byte* block = ops_.send_block(static_cast<std::size_t>(p.block));
        ops_.to_host(block, p.dev_src, p.bytes);
        p.marker = ops_.mark();
        p.src = block;
        p.dev_src = nullptr;
      }
      p.st = state::copying;
      ++first_queued_;
    }
  }

  void enqueue(pending&& p) {
    q_.push_back(std::move(p));
    pump();
  }

  /// Waits until nothing reads slot k any more (its copy or reduction is
  /// done). Depends on this rank's device only, never on a neighbour.
  void wait_slot_free(std::size_t k) {
    wait_until(
        [&] {
          int& m = slot_marker_[k];
          if (m >= 0) {
            if (!ops_.done(m)) return false;
            ops_.release(m);
            m = -1;
          }
          return true;
        },
        [&] { return fmt::format("freeing receive slot {}", k); });
  }

  void wait_recv(request& r, std::size_t bytes) {
    wait_until([&] { return r.test(); },
               [&] { return fmt::format("the receive of {} bytes from rank {}", bytes, left()); });
  }

  void mark_slot_read(std::size_t k) {
    int& m = slot_marker_[k];
    if (m >= 0) ops_.release(m);  // done already: the slot was reposted after it
    m = ops_.mark();
  }

  Ops& ops_;
  transport& t_;
  staging_mode mode_;
  std::size_t seg_bytes_;
  std::size_t nslots_;
  std::chrono::milliseconds timeout_;

  std::deque<pending> q_;
  std::size_t first_unposted_ = 0;  // entries before it are posted or done
  std::size_t first_queued_ = 0;    // entries from here have no copy started
  std::vector<int> free_blocks_;

  std::size_t slot_bytes_ = 0;
  std::vector<request> recvs_;
  std::vector<int> slot_marker_;  // work still reading the slot (-1: none)
  std::vector<request> gathers_;  // direct-mode allgather, all posted up front
};

}  // namespace ringflow::detail
