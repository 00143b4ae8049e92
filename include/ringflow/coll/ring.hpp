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
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstring>
#include <memory>
#include <type_traits>
#include <span>
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
inline void reduce_inplace(T* dst, const T* a, const T* __restrict b, std::size_t n,
                           const Op& op) {
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

/// Allgather phase of a ring over finished chunks already in `out` (chunk r
/// must be final in out when called). Optionally the first-step sends of
/// chunk r were posted by the caller already (`own_sent`).
template <class T>
void ring_allgather_phase(transport& t, T* out, std::size_t count, std::size_t seg,
                          std::vector<request>& sends, bool own_sent) {
  const int p = t.size();
  const int r = t.rank();
  const int left = ring_mod(r - 1, p), right = ring_mod(r + 1, p);
  if (!own_sent) {
    const chunk own = partition(count, p, r);
    for (std::size_t o = 0; o < own.count; o += seg) {
      const std::size_t n = std::min(seg, own.count - o);
      sends.push_back(t.isend(out + own.offset + o, n * sizeof(T), right, ring_ag_tag));
    }
  }
  // Post every receive up front: they land straight in `out`, no staging.
  struct unit {
    T* dst;
    std::size_t n;
    bool forward;
  };
  std::vector<unit> units;
  std::vector<request> recvs;
  for (int s = 0; s < p - 1; ++s) {
    const chunk c = partition(count, p, ring_mod(r - s - 1, p));
    for (std::size_t o = 0; o < c.count; o += seg) {
      const std::size_t n = std::min(seg, c.count - o);
      units.push_back({out + c.offset + o, n, s < p - 2});
      recvs.push_back(t.irecv(out + c.offset + o, n * sizeof(T), left, ring_ag_tag));
    }
  }
  for (std::size_t i = 0; i < units.size(); ++i) {
    recvs[i].wait();
    if (units[i].forward) {
      sends.push_back(t.isend(units[i].dst, units[i].n * sizeof(T), right, ring_ag_tag));
    }
  }
}

/// Reduce-scatter phase. Partial results of chunk c go to acc + offset(c);
/// the finished chunk r goes to `own_out` (which may alias in or acc). When
/// `ag_sends` is given, each finished segment of chunk r is also sent on at
/// once as the first allgather step (acc must then be the output), and those
/// sends go to *ag_sends: they complete only once the neighbour reaches its
/// allgather, so they must not be waited for with the reduce-scatter sends.
template <class T, class Op>
void ring_reduce_scatter_phase(transport& t, const T* in, T* acc, T* own_out, std::size_t count,
                               const Op& op, std::size_t seg, std::vector<request>& sends,
                               std::vector<request>* ag_sends) {
  const int p = t.size();
  const int r = t.rank();
  const int left = ring_mod(r - 1, p), right = ring_mod(r + 1, p);

  // Step 0 sends straight from the input.
  {
    const chunk c = partition(count, p, ring_mod(r - 1, p));
    for (std::size_t o = 0; o < c.count; o += seg) {
      const std::size_t n = std::min(seg, c.count - o);
      sends.push_back(t.isend(in + c.offset + o, n * sizeof(T), right, ring_rs_tag));
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

  // Staging slots: the next ring_depth receives are always posted.
  const std::size_t depth = std::min<std::size_t>(ring_depth, units.size());
  T* slots = scratch<T>(depth * seg, 0);
  std::vector<request> recvs(depth);
  auto post = [&](std::size_t i) {
    recvs[i % depth] = t.irecv(slots + (i % depth) * seg, units[i].n * sizeof(T), left,
                               ring_rs_tag);
  };
  for (std::size_t i = 0; i < depth; ++i) post(i);
  for (std::size_t i = 0; i < units.size(); ++i) {
    recvs[i % depth].wait();
    const unit& u = units[i];
    const T* staged = slots + (i % depth) * seg;
    reduce_inplace(u.dst, u.mine, staged, u.n, op);
    if (u.last) finish_range(u.dst, u.n, op, p);
    if (i + depth < units.size()) post(i + depth);
    if (!u.last) {
      sends.push_back(t.isend(u.dst, u.n * sizeof(T), right, ring_rs_tag));
    } else if (ag_sends != nullptr) {
      ag_sends->push_back(t.isend(u.dst, u.n * sizeof(T), right, ring_ag_tag));
    }
  }
}

/// Ring allreduce of `count` elements from `in` into `out` (may alias).
template <class T, class Op>
void ring_allreduce(transport& t, const T* in, T* out, std::size_t count, const Op& op,
                    std::size_t segment_bytes) {
  const int p = t.size();
  if (count == 0) return;
  if (p == 1) return single_rank_result(in, out, count, op);
  const std::size_t seg = segment_elems(segment_bytes, sizeof(T));
  const chunk own = partition(count, p, t.rank());
  std::vector<request> rs_sends, ag_sends;
  ring_reduce_scatter_phase(t, in, out, out + own.offset, count, op, seg, rs_sends, &ag_sends);
  // The allgather phase receives into chunks this rank sent from during
  // reduce-scatter: those sends must be done before the buffer is reused.
  // (The own-chunk allgather sends stay pending; chunk r is never written.)
  wait_all(rs_sends);
  ring_allgather_phase(t, out, count, seg, ag_sends, /*own_sent=*/true);
  wait_all(ag_sends);
}

/// Ring reduce-scatter: rank r gets chunk r of the reduction in `out`
/// (out.size() == partition(count, p, r).count). `out` may alias in + offset(r).
template <class T, class Op>
void ring_reduce_scatter(transport& t, const T* in, T* out, std::size_t count, const Op& op,
                         std::size_t segment_bytes) {
  const int p = t.size();
  if (count == 0) return;
  if (p == 1) return single_rank_result(in, out, count, op);
  const std::size_t seg = segment_elems(segment_bytes, sizeof(T));
  T* partial = scratch<T>(count, 1);  // partial sums of the chunks passing through
  std::vector<request> sends;
  ring_reduce_scatter_phase(t, in, partial, out, count, op, seg, sends, nullptr);
  wait_all(sends);
}

/// Ring allgather: rank r contributes `in` (= chunk r of `count`); every rank
/// gets all `count` elements in `out`. `in` may alias out + offset(r).
template <class T>
void ring_allgather(transport& t, const T* in, T* out, std::size_t count,
                    std::size_t segment_bytes) {
  const int p = t.size();
  if (count == 0) return;
  const chunk own = partition(count, p, t.rank());
  if (in != out + own.offset && own.count > 0) {
    std::memcpy(static_cast<void*>(out + own.offset), in, own.count * sizeof(T));
  }
  if (p == 1) return;
  std::vector<request> sends;
  ring_allgather_phase(t, out, count, segment_elems(segment_bytes, sizeof(T)), sends, false);
  wait_all(sends);
}

}  // namespace ringflow::detail
