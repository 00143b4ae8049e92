// Gather and scatter to and from a root (gatherv, scatterv: blocks of any
// size) and allgatherv (a ring over blocks of any size), written once
// against the transport.
//
// Gather and scatter are linear: the root posts one receive (send) per rank
// at once, straight into (from) its buffer, and each other rank sends
// (receives) one message. The root's link carries (p-1)/p of the data, which
// is the lower bound for a rooted collective, in one round of latency; a
// binomial tree would save latency on many ranks at the cost of copying
// blocks through the interior ranks. Every rank exchanges one message with
// the root even when its block is empty, so the transport compares both
// sides' sizes (a disagreement is an error naming both ranks, not a hang).
//
// Allgatherv: in step s = 0..p-2 rank r forwards block (r-s) mod p to its
// right neighbour and receives block (r-s-1) mod p from its left one, each
// in place in the output. (p-1)/p of the output crosses each link.
//
// All three only copy bytes: results are exact and identical on every rank.
#pragma once

#include <cstddef>
#include <vector>

#include "ringflow/coll/alltoall.hpp"
#include "ringflow/coll/ring.hpp"
#include "ringflow/comm/transport.hpp"

namespace ringflow::detail {

inline constexpr int gather_tag = collective_tag_base + 52;
inline constexpr int scatter_tag = collective_tag_base + 53;
inline constexpr int allgatherv_tag = collective_tag_base + 54;

/// Rank q's `count` elements of `in` land at out + displs[q] on `root`
/// (counts and displs are read on the root only; counts[root] == count).
template <class T>
void linear_gatherv(transport& t, const T* in, std::size_t count, T* out, const std::size_t* counts,
                    const std::size_t* displs, int root) {
  const int p = t.size(), r = t.rank();
  if (r != root) {
    t.isend(in, count * sizeof(T), root, gather_tag).wait();
    return;
  }
  std::vector<request> recvs;
  recvs.reserve(static_cast<std::size_t>(p));
  for (int q = 0; q < p; ++q) {
    if (q == root) continue;
    recvs.push_back(t.irecv(out + displs[q], counts[q] * sizeof(T), q, gather_tag));
  }
  copy_elems(out + displs[root], in, count);
  wait_all(recvs);
}

/// The root's counts[q] elements at in + displs[q] go to rank q's `out`
/// (`count` elements; counts and displs are read on the root only).
template <class T>
void linear_scatterv(transport& t, const T* in, const std::size_t* counts,
                     const std::size_t* displs, T* out, std::size_t count, int root) {
  const int p = t.size(), r = t.rank();
  if (r != root) {
    t.irecv(out, count * sizeof(T), root, scatter_tag).wait();
    return;
  }
  std::vector<request> sends;
  sends.reserve(static_cast<std::size_t>(p));
  for (int q = 0; q < p; ++q) {
    if (q == root) continue;
    sends.push_back(t.isend(in + displs[q], counts[q] * sizeof(T), q, scatter_tag));
  }
  copy_elems(out, in + displs[root], count);
  wait_all(sends);
}

/// Ring allgatherv: rank q's counts[q] elements (this rank's in `in`, which
/// may be out + displs[rank]) end up at out + displs[q] on every rank.
template <class T>
void ring_allgatherv(transport& t, const T* in, T* out, const std::size_t* counts,
                     const std::size_t* displs) {
  const int p = t.size(), r = t.rank();
  copy_elems(out + displs[r], in, counts[r]);
  if (p == 1) return;
  const int left = ring_mod(r - 1, p), right = ring_mod(r + 1, p);
  for (int s = 0; s < p - 1; ++s) {
    const int sent = ring_mod(r - s, p), got = ring_mod(r - s - 1, p);
    request rq = t.irecv(out + displs[got], counts[got] * sizeof(T), left, allgatherv_tag);
    request sq = t.isend(out + displs[sent], counts[sent] * sizeof(T), right, allgatherv_tag);
    rq.wait();
    sq.wait();
  }
}

}  // namespace ringflow::detail
