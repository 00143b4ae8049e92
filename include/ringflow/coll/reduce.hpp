// Reduce to a root (binomial tree; or ring reduce-scatter then a gather of
// the pieces for large buffers) and reduce-scatter with uneven pieces (a
// ring), written once against the transport.
//
// Tree: ranks are numbered relative to the root; in round k (mask 2^k) a
// rank whose relative index has bit k set sends its partial to index - 2^k
// and is done, the others receive from index + 2^k (if it exists) and
// combine. ceil(log2 p) rounds of whole-buffer messages: for small buffers.
//
// Ring: ring_reduce_scatter leaves piece r (partition()) on rank r, finished,
// and the root gathers the pieces: 2(p-1)/p of the buffer per link instead
// of log2 p whole buffers, for large buffers.
//
// reduce_scatter_v: the ring of ring.hpp with pieces of any size (counts):
// in step s rank r sends its partial of piece (r-s-1) mod p to the right and
// combines the partial of piece (r-s-2) mod p arriving from the left with
// its own input; after p-1 steps it holds piece r, finished.
//
// Determinism: each element is reduced on one chain of ranks in one fixed
// order and finished on one rank (tree: op(lower relative ranks' partial,
// higher ones'); ring: op(this rank's input, the partial from the left)), so
// the result's bits are reproducible run after run for a given algorithm,
// rank count and counts, and any rank that receives them gets those bits.
#pragma once

#include <algorithm>
#include <cstddef>
#include <vector>

#include "ringflow/coll/alltoall.hpp"
#include "ringflow/coll/partition.hpp"
#include "ringflow/coll/ring.hpp"
#include "ringflow/comm/transport.hpp"
#include "ringflow/core/reduce_op.hpp"

namespace ringflow::detail {

inline constexpr int reduce_tag = collective_tag_base + 55;
inline constexpr int reduce_gather_tag = collective_tag_base + 56;
inline constexpr int reduce_scatter_v_tag = collective_tag_base + 57;

/// Binomial-tree reduce of `count` elements to `root` (out is written on
/// the root only and may be in there).
template <class T, class Op>
void tree_reduce(transport& t, const T* in, T* out, std::size_t count, const Op& op, int root) {
  const int p = t.size(), r = t.rank();
  const int rel = ring_mod(r - root, p);
  T* acc = r == root ? out : scratch<T>(count, 0);
  T* stage = scratch<T>(count, 1);
  const T* partial = in;  // what this rank holds so far: relative ranks [rel, rel + mask)
  for (int mask = 1; mask < p; mask <<= 1) {
    if (rel & mask) {
      t.isend(partial, count * sizeof(T), ring_mod(rel - mask + root, p), reduce_tag).wait();
      return;
    }
    if (rel + mask < p) {
      t.irecv(stage, count * sizeof(T), ring_mod(rel + mask + root, p), reduce_tag).wait();
      reduce_inplace(acc, partial, static_cast<const T*>(stage), count, op);
      partial = acc;
    }
  }
  copy_elems(out, partial, count);  // p == 1 (elsewhere the root reduced into out)
  finish_range(out, count, op, p);
}

/// Ring reduce to `root`: reduce-scatter, then the root gathers the pieces.
template <class T, class Op>
void ring_reduce(transport& t, const T* in, T* out, std::size_t count, const Op& op, int root,
                 std::size_t segment_bytes) {
  const int p = t.size(), r = t.rank();
  const chunk own = partition(count, p, r);
  if (r != root) {
    std::vector<T> piece(own.count);
    ring_reduce_scatter(t, in, piece.data(), count, op, segment_bytes);
    t.isend(piece.data(), own.count * sizeof(T), root, reduce_gather_tag).wait();
    return;
  }
  // out may be in: the reduce-scatter reads all of in before it returns.
  ring_reduce_scatter(t, in, out + own.offset, count, op, segment_bytes);
  std::vector<request> recvs;
  for (int q = 0; q < p; ++q) {
    if (q == root) continue;
    const chunk c = partition(count, p, q);
    recvs.push_back(t.irecv(out + c.offset, c.count * sizeof(T), q, reduce_gather_tag));
  }
  wait_all(recvs);
}

/// Ring reduce-scatter with pieces of counts[q] elements at offsets[q] of
/// `in` (every rank the same counts); rank r's finished piece goes to out,
/// which may be in + offsets[r].
template <class T, class Op>
void ring_reduce_scatter_v(transport& t, const T* in, T* out, const std::size_t* counts,
                           const std::size_t* offsets, const Op& op) {
  const int p = t.size(), r = t.rank();
  if (p == 1) {
    copy_elems(out, in + offsets[0], counts[0]);
    finish_range(out, counts[0], op, 1);
    return;
  }
  const std::size_t widest = *std::max_element(counts, counts + p);
  T* stage = scratch<T>(widest, 0);
  // Two partials alternate: step s combines into one while the other, the
  // previous step's, is still being sent.
  T* partials = scratch<T>(2 * widest, 1);
  const int left = ring_mod(r - 1, p), right = ring_mod(r + 1, p);
  for (int s = 0; s < p - 1; ++s) {
    const int sent = ring_mod(r - s - 1, p), got = ring_mod(r - s - 2, p);
    const T* src =
        s == 0 ? in + offsets[sent] : partials + static_cast<std::size_t>((s - 1) % 2) * widest;
    request rq = t.irecv(stage, counts[got] * sizeof(T), left, reduce_scatter_v_tag);
    request sq = t.isend(src, counts[sent] * sizeof(T), right, reduce_scatter_v_tag);
    rq.wait();
    // In the last step the piece arriving is this rank's own.
    T* dst = s == p - 2 ? out : partials + static_cast<std::size_t>(s % 2) * widest;
    reduce_inplace(dst, in + offsets[got], static_cast<const T*>(stage), counts[got], op);
    sq.wait();
  }
  finish_range(out, counts[r], op, p);
}

}  // namespace ringflow::detail
