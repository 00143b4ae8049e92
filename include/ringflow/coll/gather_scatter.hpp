// Gather and scatter to and from a root (gatherv, scatterv: blocks of any
// size) and allgatherv (a ring over blocks of any size, or Bruck's rounds
// over packed blocks), written once against the transport.
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
// Bruck allgatherv (packed blocks only): after the round of distance d
// (d = 1, 2, 4, ... < p) rank r holds the min(2d, p) blocks ending at its
// own, r-2d+1 .. r (mod p), in place in the output; in that round it sends
// rank r+d the n = min(d, p-d) blocks r-n+1 .. r, which that rank lacks,
// and receives r-d-n+1 .. r-d from rank r-d. ceil(log2 p) rounds instead of
// p-1, for the same p-1 blocks sent per rank (which ones depends on the
// rank, so uneven blocks load the ranks unevenly). Blocks that wrap past
// block p-1 go as two messages (both sides split them the same way, since
// every rank has the same counts), so no block is staged or copied.
//
// All three only copy bytes: results are exact and identical on every rank.
#pragma once

#include <algorithm>
#include <cstddef>
#include <vector>

#include "ringflow/coll/alltoall.hpp"
#include "ringflow/coll/ring.hpp"
#include "ringflow/comm/transport.hpp"

namespace ringflow::detail {

inline constexpr int gather_tag = collective_tag_base + 52;
inline constexpr int scatter_tag = collective_tag_base + 53;
inline constexpr int allgatherv_tag = collective_tag_base + 54;
/// Bruck allgatherv: this tag, and the next one for the second half of a
/// round's blocks when they wrap past block p-1.
inline constexpr int bruck_allgatherv_tag = collective_tag_base + 58;

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

/// Bruck allgatherv over packed blocks: rank q's counts[q] elements (this
/// rank's in `in`, which may be its block of `out`) end up at the prefix sum
/// of the counts before q in `out`, on every rank (see the file comment).
/// Every rank must pass the same counts.
template <class T>
void bruck_allgatherv(transport& t, const T* in, T* out, const std::size_t* counts) {
  const int p = t.size(), r = t.rank();
  const auto up = static_cast<std::size_t>(p);
  // at[q]: where block q starts; at[p]: the total.
  std::vector<std::size_t> at(up + 1, 0);
  for (std::size_t q = 0; q < up; ++q) at[q + 1] = at[q] + counts[q];
  copy_elems(out + at[static_cast<std::size_t>(r)], in, counts[r]);
  if (p == 1) return;
  std::vector<request> reqs;
  reqs.reserve(4);
  // Blocks first .. first+n-1 (mod p) as one message, or two when they wrap
  // past block p-1: both sides split the same blocks the same way.
  auto post = [&](int first, int n, int peer, bool send) {
    const auto lo = static_cast<std::size_t>(first);
    const auto hi = static_cast<std::size_t>(first + n);
    auto one = [&](std::size_t from, std::size_t to, int tag) {
      T* data = out + at[from];
      const std::size_t bytes = (at[to] - at[from]) * sizeof(T);
      reqs.push_back(send ? t.isend(data, bytes, peer, tag) : t.irecv(data, bytes, peer, tag));
    };
    if (hi <= up) {
      one(lo, hi, bruck_allgatherv_tag);
    } else {
      one(lo, up, bruck_allgatherv_tag);
      one(0, hi - up, bruck_allgatherv_tag + 1);
    }
  };
  // After the round of distance d this rank holds the 2d blocks ending at
  // its own (or all p): it sends the n it has that rank r+d lacks.
  for (int d = 1; d < p; d <<= 1) {
    const int n = std::min(d, p - d);
    post(ring_mod(r - d - n + 1, p), n, ring_mod(r - d, p), false);
    post(ring_mod(r - n + 1, p), n, ring_mod(r + d, p), true);
    wait_all(reqs);
    reqs.clear();
  }
}

}  // namespace ringflow::detail
