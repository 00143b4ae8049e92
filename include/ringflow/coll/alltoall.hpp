// All-to-all exchange (rank r's block q goes to rank q): the pairwise exchange,
// for alltoall and alltoallv, and Bruck's algorithm for small uniform blocks,
// written once against the transport.
//
// Pairwise: in step s = 1..p-1 rank r sends its block for rank (r+s) mod p and
// receives the block of rank (r-s) mod p, each straight from the input into
// the output (no staging), its own block copied while the first messages
// travel; up to alltoall_window steps are in flight, so the
// links stay busy without every receive of a large group waiting at once.
// p-1 messages of n/p bytes per rank: the fewest bytes possible, but p-1
// latency terms. Every pair exchanges one message even when it is empty, so
// the transport compares the two sides' counts (a disagreement is an error
// naming both ranks, never a hang) and stamps reach every peer.
//
// Bruck: the input is rotated so that position i holds the block for rank
// r+i; in round k (k = 1, 2, 4, ... < p) every block whose position has bit k
// set travels, packed into one message, to rank r+k (and the matching blocks
// arrive from r-k); after ceil(log2 p) rounds position i holds the block of
// rank r-i, which the final rotation puts in place. ceil(log2 p) messages of
// about n/2 bytes each plus local copies: fewer messages for more bytes, the
// choice for small blocks on many ranks.
//
// Both only copy bytes, so every rank's result is exact and reproducible.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstring>
#include <utility>

#include "ringflow/coll/ring.hpp"
#include "ringflow/comm/transport.hpp"

namespace ringflow::detail {

/// One tag for both algorithms: their first messages go the same way (to
/// rank r+1, from r-1), so ranks that chose differently because their
/// counts differ meet there and their stamps report the mismatch.
inline constexpr int alltoall_tag = collective_tag_base + 50;
/// Pairwise steps in flight at once (each one receive and one send).
inline constexpr int alltoall_window = 8;

/// memcpy of n elements that tolerates n == 0 with null pointers (an empty
/// span's data() may be null) and skips a copy onto itself.
template <class T>
inline void copy_elems(T* dst, const T* src, std::size_t n) {
  if (n != 0 && dst != src) std::memcpy(static_cast<void*>(dst), src, n * sizeof(T));
}

/// The pairwise schedule over blocks: block(q) is {pointer, elements} of
/// what this rank sends q (send) or receives from q (recv). The requests of
/// the steps in flight live in fixed slots: no allocation per call.
/// `self()` copies this rank's own block; it runs once the first window is
/// posted, so the copy overlaps those transfers.
template <class T, class SendBlock, class RecvBlock, class SelfCopy>
void pairwise_exchange(transport& t, SendBlock send_block, RecvBlock recv_block, SelfCopy self) {
  const int p = t.size(), r = t.rank();
  const int steps = p - 1;
  if (steps <= 0) {
    self();
    return;
  }
  const int window = std::min(steps, alltoall_window);
  request recvs[alltoall_window], sends[alltoall_window];
  auto post = [&](int s) {
    const int to = ring_mod(r + s, p), from = ring_mod(r - s, p);
    const auto in = recv_block(from);
    const auto out = send_block(to);
    recvs[(s - 1) % alltoall_window] = t.irecv(in.first, in.second * sizeof(T), from, alltoall_tag);
    sends[(s - 1) % alltoall_window] = t.isend(out.first, out.second * sizeof(T), to, alltoall_tag);
  };
  for (int s = 1; s <= window; ++s) post(s);
  self();
  for (int s = 1; s <= steps; ++s) {
    recvs[(s - 1) % alltoall_window].wait();
    sends[(s - 1) % alltoall_window].wait();
    if (s + window <= steps) post(s + window);
  }
}

/// Pairwise alltoallv: rank r sends send_counts[q] elements from
/// in + send_displs[q] to rank q and receives recv_counts[q] elements from q
/// into out + recv_displs[q]. send_counts[r] must equal recv_counts[r].
template <class T>
void pairwise_alltoallv(transport& t, const T* in, const std::size_t* send_counts,
                        const std::size_t* send_displs, T* out, const std::size_t* recv_counts,
                        const std::size_t* recv_displs) {
  const int r = t.rank();
  pairwise_exchange<T>(
      t, [&](int q) { return std::pair(in + send_displs[q], send_counts[q]); },
      [&](int q) { return std::pair(out + recv_displs[q], recv_counts[q]); },
      [&] { copy_elems(out + recv_displs[r], in + send_displs[r], send_counts[r]); });
}

/// Pairwise alltoall of `count` elements per peer (in and out hold p blocks).
template <class T>
void pairwise_alltoall(transport& t, const T* in, T* out, std::size_t count) {
  const auto r = static_cast<std::size_t>(t.rank());
  pairwise_exchange<T>(
      t, [&](int q) { return std::pair(in + static_cast<std::size_t>(q) * count, count); },
      [&](int q) { return std::pair(out + static_cast<std::size_t>(q) * count, count); },
      [&] { copy_elems(out + r * count, in + r * count, count); });
}

/// Bruck alltoall of `count` elements per peer (see the file comment).
template <class T>
void bruck_alltoall(transport& t, const T* in, T* out, std::size_t count) {
  const int p = t.size(), r = t.rank();
  const auto up = static_cast<std::size_t>(p);
  if (p == 1) {
    copy_elems(out, in, count);
    return;
  }
  // Position i holds the block bound for rank r+i.
  T* rotated = scratch<T>(up * count, 0);
  for (int i = 0; i < p; ++i) {
    copy_elems(rotated + static_cast<std::size_t>(i) * count,
               in + static_cast<std::size_t>(ring_mod(r + i, p)) * count, count);
  }
  // At most p/2 + 1 positions have a given bit set: one half for the
  // packed send, one for the packed receive.
  const std::size_t half_blocks = up / 2 + 1;
  T* packed_out = scratch<T>(2 * half_blocks * count, 1);
  T* packed_in = packed_out + half_blocks * count;
  for (int k = 1; k < p; k <<= 1) {
    std::size_t blocks = 0;
    for (int i = 1; i < p; ++i) {
      if (i & k) {
        copy_elems(packed_out + blocks * count, rotated + static_cast<std::size_t>(i) * count,
                   count);
        ++blocks;
      }
    }
    // Every rank packs the same positions, so both sides agree on the size.
    request rq = t.irecv(packed_in, blocks * count * sizeof(T), ring_mod(r - k, p), alltoall_tag);
    request sq = t.isend(packed_out, blocks * count * sizeof(T), ring_mod(r + k, p), alltoall_tag);
    rq.wait();
    sq.wait();
    blocks = 0;
    for (int i = 1; i < p; ++i) {
      if (i & k) {
        copy_elems(rotated + static_cast<std::size_t>(i) * count, packed_in + blocks * count,
                   count);
        ++blocks;
      }
    }
  }
  // Position i now holds the block of rank r-i.
  for (int i = 0; i < p; ++i) {
    copy_elems(out + static_cast<std::size_t>(ring_mod(r - i, p)) * count,
               rotated + static_cast<std::size_t>(i) * count, count);
  }
}

}  // namespace ringflow::detail
