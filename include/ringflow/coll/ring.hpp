// Pipelined ring collectives: reduce-scatter, allgather and allreduce
// (= reduce-scatter + allgather), written once against the transport.
//
// The buffer is cut into one chunk per rank (see partition()) and each chunk
// into segments. In reduce-scatter step s, rank r receives chunk (r-s-2) mod p
// from its left neighbour, combines it with its own input and forwards it
// right at step s+1, so after p-1 steps rank r holds the finished chunk r. A
// segment is forwarded the moment it is reduced, so sending segment k
// overlaps receiving and reducing segment k+1, and the ring stays busy across
// step boundaries. The allgather phase then circulates finished chunks, each
// segment forwarded as soon as it lands.
//
// Determinism: chunk c is always combined in the same rank order, by the same
// ranks, and the allgather phase copies bytes; so every rank gets identical
// bits, run after run, for a given (ranks, count, segment size).
//
// Memory: the schedule (which segment goes where, when, combined with what)
// is written once, in the *_on functions, against a memory policy that says
// how a segment gets from a buffer onto the transport and back. The default,
// host_ring_memory, is the CPU's: buffers in host memory that the transport
// reads and writes directly. ringflow/cuda/ring.hpp has the device policies
// (device buffers staged through pinned host memory over MPI, or handed
// straight to a transport that takes device pointers, such as NCCL p2p). The
// same schedule with the same per-element op gives the same bits in both.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstring>
#include <memory>
#include <span>
#include <type_traits>
#include <vector>

#include "ringflow/coll/partition.hpp"
#include "ringflow/comm/transport.hpp"
#include "ringflow/core/reduce_op.hpp"

namespace ringflow::detail {

inline constexpr int ring_rs_tag = collective_tag_base + 1;
inline constexpr int ring_ag_tag = collective_tag_base + 2;
/// Receives posted ahead in the reduce-scatter phase (staging slots).
inline constexpr int ring_depth = 4;

template <class T, class Op>
inline void reduce_into(T* __restrict dst, const T* __restrict a, const T* __restrict b,
                        std::size_t n, const Op& op) {
  for (std::size_t i = 0; i < n; ++i) dst[i] = op(a[i], b[i]);
}

// In-place variant: dst may alias a (same index), so no restrict on those.
template <class T, class Op>
inline void reduce_inplace(T* dst, const T* a, const T* __restrict b, std::size_t n, const Op& op) {
  for (std::size_t i = 0; i < n; ++i) dst[i] = op(a[i], b[i]);
}

template <class T, class Op>
inline void finish_range(T* dst, std::size_t n, const Op& op, int p) {
  if constexpr (Op::kind == op_kind::avg) {
    for (std::size_t i = 0; i < n; ++i) dst[i] = op.finish(dst[i], p);
  } else {
    (void)dst, (void)n, (void)op, (void)p;
  }
}

/// The one-rank case of every allreduce and reduce-scatter: the result is the
/// input (copied unless in place), finished (avg divides by 1).
template <class T, class Op>
void single_rank_result(const T* in, T* out, std::size_t count, const Op& op) {
  if (out != in) std::memcpy(static_cast<void*>(out), in, count * sizeof(T));
  finish_range(out, count, op, 1);
}

inline std::size_t segment_elems(std::size_t segment_bytes, std::size_t elem_size) {
  return std::max<std::size_t>(1, segment_bytes / elem_size);
}

inline int ring_mod(long x, int p) { return static_cast<int>(((x % p) + p) % p); }

/// Per-thread scratch memory that is reused across calls: allocating (and
/// zero-filling, and page-faulting) a fresh staging buffer per collective
/// costs more than a 1 MiB allreduce itself. `which` selects one of two
/// independent buffers. Contents are uninitialized.
template <class T>
T* scratch(std::size_t count, int which) {
  static_assert(std::is_trivially_copyable_v<T>);
  struct buffer {
    std::unique_ptr<std::byte[]> data;
    std::size_t bytes = 0;
  };
  thread_local buffer buffers[2];
  buffer& b = buffers[which];
  const std::size_t need = count * sizeof(T) + 64;
  if (b.bytes < need) {
    b.data.reset(new std::byte[need]);
    b.bytes = need;
  }
  void* p = b.data.get();
  std::size_t space = b.bytes;
  return static_cast<T*>(std::align(64, count * sizeof(T), p, space));
}

/// The CPU memory policy of the ring (see the file comment). A policy `m`
/// serves one collective call and provides, for element type T:
///   send(t, src, n, peer, tag, sends)    post a send of src[0, n) (final data);
///                                        a request to wait for goes to `sends`
///   sources_read(sends)                  returns once the sends pushed to
///                                        `sends` have read their sources
///   complete(sends)                      returns once every send and every
///                                        copy or kernel of the call is done
///   recv_depth()                         reduce-scatter: receives posted ahead
///   open_slots(depth, seg)               reduce-scatter: `depth` receive slots
///   post_recv(t, k, n, peer, tag)        post a receive of n elements into slot k
///   reduce_received(k, dst, mine, n, op) wait for slot k; dst = op(mine, slot)
///   finish(dst, n, op, p)                the op's last step on a finished range
///   gather_depth(units)                  allgather: receives posted ahead
///   post_gather(t, k, dst, n, peer, tag) post a receive bound for dst (slot k)
///   land(k, dst, n)                      wait for it: dst then holds the data
///   forward(t, k, dst, n, peer, tag, s)  send on the segment that just landed
///   copy(dst, src, n), partial(count)    a copy; scratch for partial sums
/// "Done" is in the policy's order: for device policies, in stream order.
struct host_ring_memory {
  template <class T>
  void send(transport& t, const T* src, std::size_t n, int peer, int tag,
            std::vector<request>& sends) {
    sends.push_back(t.isend(src, n * sizeof(T), peer, tag));
  }
  void sources_read(std::vector<request>& sends) { wait_all(sends); }
  void complete(std::vector<request>& sends) { wait_all(sends); }

  static constexpr std::size_t recv_depth() { return ring_depth; }
  template <class T>
  void open_slots(std::size_t depth, std::size_t seg) {
    slots_ = scratch<T>(depth * seg, 0);
    slot_bytes_ = seg * sizeof(T);
    recvs_.resize(depth);
  }
  template <class T>
  void post_recv(transport& t, std::size_t k, std::size_t n, int peer, int tag) {
    recvs_[k] = t.irecv(slot<T>(k), n * sizeof(T), peer, tag);
  }
  template <class T, class Op>
  void reduce_received(std::size_t k, T* dst, const T* mine, std::size_t n, const Op& op) {
    recvs_[k].wait();
    reduce_inplace(dst, mine, slot<T>(k), n, op);
  }
  template <class T, class Op>
  void finish(T* dst, std::size_t n, const Op& op, int p) {
    finish_range(dst, n, op, p);
  }

  // Every allgather receive is posted up front and lands straight in the
  // output: no staging, nothing to copy.
  std::size_t gather_depth(std::size_t units) {
    gathers_.resize(units);
    return units;
  }
  template <class T>
  void post_gather(transport& t, std::size_t k, T* dst, std::size_t n, int peer, int tag) {
    gathers_[k] = t.irecv(dst, n * sizeof(T), peer, tag);
  }
  template <class T>
  void land(std::size_t k, T* /*dst*/, std::size_t /*n*/) {
    gathers_[k].wait();
  }
  template <class T>
  void forward(transport& t, std::size_t /*k*/, const T* dst, std::size_t n, int peer, int tag,
               std::vector<request>& sends) {
    send(t, dst, n, peer, tag, sends);
  }

  template <class T>
  void copy(T* dst, const T* src, std::size_t n) {
    std::memcpy(static_cast<void*>(dst), src, n * sizeof(T));
  }
  template <class T>
  T* partial(std::size_t count) {
    return scratch<T>(count, 1);
  }

 private:
  template <class T>
  T* slot(std::size_t k) const {
    return reinterpret_cast<T*>(static_cast<std::byte*>(slots_) + k * slot_bytes_);
  }
  void* slots_ = nullptr;
  std::size_t slot_bytes_ = 0;
  std::vector<request> recvs_;
  std::vector<request> gathers_;
};

/// Allgather phase of a ring over finished chunks already in `out` (chunk r
/// must be final in out when called). Optionally the first-step sends of
/// chunk r were posted by the caller already (`own_sent`).
template <class T, class M>
void ring_allgather_phase(M& m, transport& t, T* out, std::size_t count, std::size_t seg,
                          std::vector<request>& sends, bool own_sent) {
  const int p = t.size();
  const int r = t.rank();
  const int left = ring_mod(r - 1, p), right = ring_mod(r + 1, p);
  if (!own_sent) {
    const chunk own = partition(count, p, r);
    for (std::size_t o = 0; o < own.count; o += seg) {
      const std::size_t n = std::min(seg, own.count - o);
      m.send(t, static_cast<const T*>(out + own.offset + o), n, right, ring_ag_tag, sends);
    }
  }
  struct unit {
    T* dst;
    std::size_t n;
    bool forward;
  };
  std::vector<unit> units;
  for (int s = 0; s < p - 1; ++s) {
    const chunk c = partition(count, p, ring_mod(r - s - 1, p));
    for (std::size_t o = 0; o < c.count; o += seg) {
      const std::size_t n = std::min(seg, c.count - o);
      units.push_back({out + c.offset + o, n, s < p - 2});
    }
  }
  // The host policy posts every receive up front (depth == units), straight
  // into `out`; a staging policy keeps `depth` of them in flight.
  const std::size_t depth = m.gather_depth(units.size());
  auto post = [&](std::size_t i) {
    m.post_gather(t, i % depth, units[i].dst, units[i].n, left, ring_ag_tag);
  };
  for (std::size_t i = 0; i < depth; ++i) post(i);
  for (std::size_t i = 0; i < units.size(); ++i) {
    const unit& u = units[i];
    m.land(i % depth, u.dst, u.n);
    if (u.forward)
      m.forward(t, i % depth, static_cast<const T*>(u.dst), u.n, right, ring_ag_tag, sends);
    if (i + depth < units.size()) post(i + depth);
  }
}

/// Reduce-scatter phase. Partial results of chunk c go to acc + offset(c);
/// the finished chunk r goes to `own_out` (which may alias in or acc). When
/// `ag_sends` is given, each finished segment of chunk r is also sent on at
/// once as the first allgather step (acc must then be the output), and those
/// sends go to *ag_sends: they complete only once the neighbour reaches its
/// allgather, so they must not be waited for with the reduce-scatter sends.
template <class T, class Op, class M>
void ring_reduce_scatter_phase(M& m, transport& t, const T* in, T* acc, T* own_out,
                               std::size_t count, const Op& op, std::size_t seg,
                               std::vector<request>& sends, std::vector<request>* ag_sends) {
  const int p = t.size();
  const int r = t.rank();
  const int left = ring_mod(r - 1, p), right = ring_mod(r + 1, p);

  // Step 0 sends straight from the input.
  {
    const chunk c = partition(count, p, ring_mod(r - 1, p));
    for (std::size_t o = 0; o < c.count; o += seg) {
      const std::size_t n = std::min(seg, c.count - o);
      m.send(t, in + c.offset + o, n, right, ring_rs_tag, sends);
    }
  }

  struct unit {
    const T* mine;  // this rank's input for the segment
    T* dst;         // where the combined segment goes
    std::size_t n;
    bool last;  // final step: dst is the finished own chunk
  };
  std::vector<unit> units;
  for (int s = 0; s < p - 1; ++s) {
    const int cid = ring_mod(r - s - 2, p);
    const chunk c = partition(count, p, cid);
    const bool last = (s == p - 2);
    for (std::size_t o = 0; o < c.count; o += seg) {
      const std::size_t n = std::min(seg, c.count - o);
      T* dst = last ? own_out + o : acc + c.offset + o;
      units.push_back({in + c.offset + o, dst, n, last});
    }
  }
  if (units.empty()) return;

  // Staging slots: the next depth receives are always posted.
  const std::size_t depth = std::min<std::size_t>(m.recv_depth(), units.size());
  m.template open_slots<T>(depth, seg);
  auto post = [&](std::size_t i) {
    m.template post_recv<T>(t, i % depth, units[i].n, left, ring_rs_tag);
  };
  for (std::size_t i = 0; i < depth; ++i) post(i);
  for (std::size_t i = 0; i < units.size(); ++i) {
    const unit& u = units[i];
    m.reduce_received(i % depth, u.dst, u.mine, u.n, op);
    if (u.last) m.finish(u.dst, u.n, op, p);
    if (i + depth < units.size()) post(i + depth);
    if (!u.last) {
      m.send(t, static_cast<const T*>(u.dst), u.n, right, ring_rs_tag, sends);
    } else if (ag_sends != nullptr) {
      m.send(t, static_cast<const T*>(u.dst), u.n, right, ring_ag_tag, *ag_sends);
    }
  }
}

/// Ring allreduce of `count` elements from `in` into `out` (may alias), in
/// the memory policy `m`'s buffers (`p == 1` included).
template <class T, class Op, class M>
void ring_allreduce_on(M& m, transport& t, const T* in, T* out, std::size_t count, const Op& op,
                       std::size_t segment_bytes) {
  const int p = t.size();
  if (count == 0) return;
  if (p == 1) {
    if (out != in) m.copy(out, in, count);
    m.finish(out, count, op, 1);
    std::vector<request> none;
    m.complete(none);
    return;
  }
  const std::size_t seg = segment_elems(segment_bytes, sizeof(T));
  const chunk own = partition(count, p, t.rank());
  std::vector<request> rs_sends, ag_sends;
  ring_reduce_scatter_phase(m, t, in, out, out + own.offset, count, op, seg, rs_sends, &ag_sends);
  // The allgather phase receives into chunks this rank sent from during
  // reduce-scatter: those sends must have read them before the buffer is
  // reused. (The own-chunk allgather sends stay pending; chunk r is never
  // written.)
  m.sources_read(rs_sends);
  ring_allgather_phase(m, t, out, count, seg, ag_sends, /*own_sent=*/true);
  m.complete(ag_sends);
}

/// Ring reduce-scatter in the policy's buffers (see ring_reduce_scatter).
template <class T, class Op, class M>
void ring_reduce_scatter_on(M& m, transport& t, const T* in, T* out, std::size_t count,
                            const Op& op, std::size_t segment_bytes) {
  const int p = t.size();
  if (count == 0) return;
  if (p == 1) {
    if (out != in) m.copy(out, in, count);
    m.finish(out, count, op, 1);
    std::vector<request> none;
    m.complete(none);
    return;
  }
  const std::size_t seg = segment_elems(segment_bytes, sizeof(T));
  T* partial = m.template partial<T>(count);  // partial sums of the chunks passing through
  std::vector<request> sends;
  ring_reduce_scatter_phase(m, t, in, partial, out, count, op, seg, sends, nullptr);
  m.complete(sends);
}

/// Ring allgather in the policy's buffers (see ring_allgather).
template <class T, class M>
void ring_allgather_on(M& m, transport& t, const T* in, T* out, std::size_t count,
                       std::size_t segment_bytes) {
  const int p = t.size();
  if (count == 0) return;
  const chunk own = partition(count, p, t.rank());
  if (in != out + own.offset && own.count > 0) m.copy(out + own.offset, in, own.count);
  std::vector<request> sends;
  if (p > 1) {
    ring_allgather_phase(m, t, out, count, segment_elems(segment_bytes, sizeof(T)), sends, false);
  }
  m.complete(sends);
}

/// Ring allreduce of `count` elements from `in` into `out` (may alias).
template <class T, class Op>
void ring_allreduce(transport& t, const T* in, T* out, std::size_t count, const Op& op,
                    std::size_t segment_bytes) {
  if (count == 0) return;
  if (t.size() == 1) return single_rank_result(in, out, count, op);
  host_ring_memory m;
  ring_allreduce_on(m, t, in, out, count, op, segment_bytes);
}

/// Ring reduce-scatter: rank r gets chunk r of the reduction in `out`
/// (out.size() == partition(count, p, r).count). `out` may alias in + offset(r).
template <class T, class Op>
void ring_reduce_scatter(transport& t, const T* in, T* out, std::size_t count, const Op& op,
                         std::size_t segment_bytes) {
  if (count == 0) return;
  if (t.size() == 1) return single_rank_result(in, out, count, op);
  host_ring_memory m;
  ring_reduce_scatter_on(m, t, in, out, count, op, segment_bytes);
}

/// Ring allgather: rank r contributes `in` (= chunk r of `count`); every rank
/// gets all `count` elements in `out`. `in` may alias out + offset(r).
template <class T>
void ring_allgather(transport& t, const T* in, T* out, std::size_t count,
                    std::size_t segment_bytes) {
  host_ring_memory m;
  ring_allgather_on(m, t, in, out, count, segment_bytes);
}

}  // namespace ringflow::detail
