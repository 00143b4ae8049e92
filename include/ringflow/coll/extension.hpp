// The extension API: what code outside coll/ needs to run collectives of
// its own the way ringflow's do. The CUDA paths (src/cuda) and the trainers
// (src/train) are written against this header only; so can a user's new
// memory kind, backend glue or trainer. Everything in `detail::` may change
// from one release to the next; what is here is documented
// (docs/extending.md) and kept.
//
// Three pieces:
//  - collective_call: the bookkeeping every collective does on entry and exit
//    (its sequence number, the cross-rank check of check_mode, its flight
//    record and the algorithm it ran), so a collective of your own is checked,
//    recorded and named in a hang report like a built-in one.
//  - The ring schedule over a memory policy: ring_allreduce, ring_reduce_scatter
//    and ring_allgather take a policy `M` (the concept ring_memory) that says
//    how a segment gets from a buffer onto the transport and back; the
//    schedule, and so the bits of the result, are the CPU ring's.
//    host_ring_memory is the CPU's policy; staged_ring_memory<Ops> builds one
//    for memory the transport cannot reach from a few copy/reduce/marker ops
//    (ring_staging.hpp describes them; cuda/ring.cpp instantiates it).
//  - enqueue: runs work on the communicator's progress thread, in order with
//    the nonblocking collectives, and hands back a collective_handle.
//
//   // a collective of your own, checked and recorded like a built-in one
//   ringflow::ext::collective_call call(comm, coll_kind::allreduce, dtype_of<float>,
//                                       op_kind::sum, n);
//   call.note_algorithm("my_ring");
//   my_memory m(...);  // satisfies ext::ring_memory<my_memory, float>
//   ringflow::ext::ring_allreduce(m, comm.raw(), in, out, n, sum_op{}, 256 << 10);
#pragma once

#include <chrono>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <string_view>
#include <vector>

#include "ringflow/coll/async.hpp"
#include "ringflow/coll/broadcast.hpp"
#include "ringflow/coll/collectives.hpp"
#include "ringflow/coll/fingerprint.hpp"
#include "ringflow/coll/ring.hpp"
#include "ringflow/coll/ring_staging.hpp"
#include "ringflow/comm/communicator.hpp"
#include "ringflow/comm/transport.hpp"
#include "ringflow/core/dtype.hpp"
#include "ringflow/core/dtype_visit.hpp"
#include "ringflow/core/reduce_op.hpp"

namespace ringflow::ext {

// ---- a collective's bookkeeping ---------------------------------------------

/// Begins a collective on `comm` on construction and ends its flight record
/// on destruction (done, or failed when left by an exception). Construct it
/// before the first message and keep it until the last completes; every rank
/// must construct one with the same arguments, in the same order as its
/// other collectives on `comm`. With check_mode::full the constructor
/// exchanges the call's fingerprint and throws usage_error, on every rank,
/// naming the ranks whose calls differ.
class collective_call {
 public:
  collective_call(const communicator& comm, coll_kind kind, dtype type, op_kind op,
                  std::size_t count, int root = -1)
      : comm_(comm), sequence_(detail::begin_collective(comm, kind, type, op, count, root)),
        scope_(comm) {}
  collective_call(const collective_call&) = delete;
  collective_call& operator=(const collective_call&) = delete;

  /// Names the algorithm in the flight record (and so in hang reports and
  /// ringflow-doctor). `name` must outlive the process: a string literal.
  void note_algorithm(std::string_view name) const noexcept { detail::note_algorithm(comm_, name); }
  /// This collective's number on the communicator (0, 1, ...).
  std::uint64_t sequence() const noexcept { return sequence_; }

 private:
  const communicator& comm_;
  std::uint64_t sequence_;
  detail::collective_scope scope_;
};

/// Begins a collective whose work is only queued (on a device stream, for
/// instance) when the call returns: its flight record ends when the next
/// collective on `comm` begins. The same rules as collective_call otherwise.
inline std::uint64_t begin_queued_collective(const communicator& comm, coll_kind kind, dtype type,
                                             op_kind op, std::size_t count, int root = -1) {
  return detail::begin_collective(comm, kind, type, op, count, root);
}

// ---- the ring schedule over a memory policy -----------------------------------

/// A ring memory policy for element type T: the operations ring.hpp's
/// schedule calls (their meaning is listed at detail::host_ring_memory). One
/// policy object serves one collective call.
template <class M, class T>
concept ring_memory = requires(M& m, transport& t, const T* src, T* dst, std::size_t n,
                               std::size_t k, int peer, int tag, std::vector<request>& sends,
                               const sum_op& op) {
  m.template send<T>(t, src, n, peer, tag, sends);
  m.sources_read(sends);
  m.complete(sends);
  { m.recv_depth() } -> std::convertible_to<std::size_t>;
  m.template open_slots<T>(n, n);
  m.template post_recv<T>(t, k, n, peer, tag);
  m.template reduce_received<T, sum_op>(k, dst, src, n, op);
  m.template finish<T, sum_op>(dst, n, op, peer);
  { m.gather_depth(n) } -> std::convertible_to<std::size_t>;
  m.template post_gather<T>(t, k, dst, n, peer, tag);
  m.template land<T>(k, dst, n);
  m.template forward<T>(t, k, dst, n, peer, tag, sends);
  m.template copy<T>(dst, src, n);
  { m.template partial<T>(n) } -> std::same_as<T*>;
};

/// The CPU's policy: host buffers the transport reads and writes directly.
using host_ring_memory = detail::host_ring_memory;

/// A policy for memory the transport cannot reach (or reaches only after
/// queued work), built from an ops object (see ring_staging.hpp's comment).
template <class Ops>
using staged_ring_memory = detail::staged_ring_memory<Ops>;
using staging_mode = detail::staging_mode;

/// Ring allreduce of `count` elements from `in` into `out` (may alias) in
/// the policy's buffers; the same schedule, and bits, as the CPU ring.
/// Call it inside a collective_call.
template <class T, class Op, class M>
requires ring_memory<M, T>
void ring_allreduce(M& m, transport& t, const T* in, T* out, std::size_t count, const Op& op,
                    std::size_t segment_bytes) {
  detail::ring_allreduce_on(m, t, in, out, count, op, segment_bytes);
}

/// Ring reduce-scatter: rank r gets chunk r (partition(count, p, r)) in `out`.
template <class T, class Op, class M>
requires ring_memory<M, T>
void ring_reduce_scatter(M& m, transport& t, const T* in, T* out, std::size_t count, const Op& op,
                         std::size_t segment_bytes) {
  detail::ring_reduce_scatter_on(m, t, in, out, count, op, segment_bytes);
}

/// Ring allgather: rank r contributes chunk r of `count`; all get `out`.
template <class T, class M>
requires ring_memory<M, T>
void ring_allgather(M& m, transport& t, const T* in, T* out, std::size_t count,
                    std::size_t segment_bytes) {
  detail::ring_allgather_on(m, t, in, out, count, segment_bytes);
}

/// Elements per pipelined segment for `segment_bytes` (at least 1).
inline std::size_t segment_elems(std::size_t segment_bytes, std::size_t elem_size) {
  return detail::segment_elems(segment_bytes, elem_size);
}

/// (x mod p) in [0, p): ring neighbour arithmetic.
inline int ring_mod(long x, int p) { return detail::ring_mod(x, p); }

/// True when [a, a+na) and [b, b+nb) share an element (in-place calls are
/// `a == b` with equal sizes; partial overlap is a usage error).
template <class T>
bool overlaps(const T* a, std::size_t na, const T* b, std::size_t nb) {
  return detail::overlaps(a, na, b, nb);
}

/// Pipelined broadcast of `bytes` from `root` over host memory the transport
/// reaches (the byte-level core of ringflow::broadcast).
inline void broadcast_bytes(transport& t, void* data, std::size_t bytes, int root,
                            std::size_t segment_bytes = default_segment_bytes) {
  detail::broadcast_bytes(t, data, bytes, root, segment_bytes);
}

// ---- a transport of your own -----------------------------------------------------

/// What a transport's isend/irecv return inside a request: test() and
/// wait() of one pending operation (see comm/transport.hpp).
using request_state = detail::request_state;

/// now + timeout, saturating (a "forever" timeout never overflows).
inline std::chrono::steady_clock::time_point deadline_after(std::chrono::milliseconds timeout) {
  return detail::deadline_after(timeout);
}

// ---- the progress thread --------------------------------------------------------

/// Queues `work(dup)` on `comm`'s progress thread, where `dup` is the
/// communicator's private duplicate (so the work's messages never match the
/// caller's). Work runs one item at a time in the order queued, which must
/// be the same on every rank, after the nonblocking collectives queued
/// before it. The handle's wait() rethrows what `work` threw.
inline collective_handle enqueue(const communicator& comm,
                                 std::function<void(const communicator&)> work) {
  return collective_handle(detail::enqueue(comm, std::move(work)));
}

}  // namespace ringflow::ext
