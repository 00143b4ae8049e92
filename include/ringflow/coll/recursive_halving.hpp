// Reduce-scatter by recursive halving and allgather by recursive doubling
// (the two halves of the halving-doubling allreduce, on their own): log2(p)
// messages instead of the ring's p-1, the same bytes ((p-1)/p of the buffer
// per rank). For power-of-two rank counts only: the pieces are
// partition(count, p, r), and with p ranks folded onto fewer the folded
// blocks would not line up with the pieces reduce_scatter/allgather promise,
// so collectives.hpp runs the ring for other counts (docs/collectives.md).
//
// Determinism: piece r is reduced only on rank r, every combine takes the
// lower window's partial first, and the allgather copies bytes.
#pragma once

#include <cstddef>
#include <cstring>

#include "ringflow/coll/fold.hpp"
#include "ringflow/coll/partition.hpp"
#include "ringflow/coll/ring.hpp"
#include "ringflow/comm/transport.hpp"

namespace ringflow::detail {

inline constexpr int rh_scatter_tag = collective_tag_base + 44;
inline constexpr int rd_gather_tag = collective_tag_base + 45;

/// True when the recursive algorithms serve p ranks (a power of two).
constexpr bool recursive_halving_fits(int p) { return p >= 1 && pow2_floor(p) == p; }

/// The pieces [b0, b1) of partition(count, p, .) as one contiguous range.
inline chunk piece_range(std::size_t count, int p, int b0, int b1) {
  const std::size_t begin = partition(count, p, b0).offset;
  const std::size_t end = b1 == p ? count : partition(count, p, b1).offset;
  return chunk{begin, end - begin};
}

/// The recursive-halving rounds over q ranks (a power of two), this one
/// being index `me`, with the buffer cut into partition(count, q, .): round
/// k keeps half of the current window of pieces, sends the other half of
/// `src` to index me ^ (q >> (k+1)) and reduces what comes back into `acc`
/// (the lower window's partial first). Afterwards piece `me` of `acc` holds
/// the reduction over the q ranks (not finished). `acc` may equal `src`;
/// `incoming` holds at least count/2 + 1 elements; rank_of(index) names
/// the rank behind an index. Shared with the halving-doubling allreduce.
template <class T, class Op, class RankOf>
void halving_rounds(transport& t, const T* src, T* acc, T* incoming, std::size_t count, int q,
                    int me, RankOf&& rank_of, const Op& op, int tag) {
  int lo = 0, hi = q;
  for (int mask = q / 2; mask >= 1; mask >>= 1) {
    const int peer = rank_of(me ^ mask);
    const int mid = lo + mask;
    const bool lower = (me & mask) == 0;
    const chunk keep = lower ? piece_range(count, q, lo, mid) : piece_range(count, q, mid, hi);
    const chunk give = lower ? piece_range(count, q, mid, hi) : piece_range(count, q, lo, mid);
    request rq = t.irecv(incoming, keep.count * sizeof(T), peer, tag);
    request sq = t.isend(src + give.offset, give.count * sizeof(T), peer, tag);
    rq.wait();
    if (lower) {
      combine_to(acc + keep.offset, src + keep.offset, static_cast<const T*>(incoming), keep.count,
                 op);
    } else {
      combine_to(acc + keep.offset, static_cast<const T*>(incoming), src + keep.offset, keep.count,
                 op);
    }
    sq.wait();
    src = acc;
    (lower ? hi : lo) = mid;
  }
}

/// The recursive-doubling rounds over q ranks (a power of two), index `me`:
/// round k swaps the aligned window of 2^k pieces (partition(count, q, .))
/// this index holds in `out` with index me ^ 2^k's, so afterwards every
/// piece is everywhere. Shared with the halving-doubling allreduce.
template <class T, class RankOf>
void doubling_rounds(transport& t, T* out, std::size_t count, int q, int me, RankOf&& rank_of,
                     int tag) {
  for (int mask = 1; mask < q; mask <<= 1) {
    const int other = me ^ mask;
    const int peer = rank_of(other);
    const int mine0 = me & ~(mask - 1), theirs0 = other & ~(mask - 1);
    const chunk mine = piece_range(count, q, mine0, mine0 + mask);
    const chunk theirs = piece_range(count, q, theirs0, theirs0 + mask);
    request rq = t.irecv(out + theirs.offset, theirs.count * sizeof(T), peer, tag);
    request sq = t.isend(out + mine.offset, mine.count * sizeof(T), peer, tag);
    rq.wait();
    sq.wait();
  }
}

/// Reduce-scatter of `count` elements: rank r gets piece r of the reduction
/// in `out` (partition(count, p, r).count elements; may alias that piece of
/// `in`). p must be a power of two.
template <class T, class Op>
void halving_reduce_scatter(transport& t, const T* in, T* out, std::size_t count, const Op& op) {
  const int p = t.size(), r = t.rank();
  const chunk own = partition(count, p, r);
  if (p == 1) return single_rank_result(in, out, count, op);
  if (count == 0) return;
  // acc: this rank's partial results, at their places in the whole buffer
  // (only the current window is meaningful); incoming: the partner's half.
  T* acc = scratch<T>(count, 1);
  T* incoming = scratch<T>(count / 2 + 1, 0);
  halving_rounds(
      t, in, acc, incoming, count, p, r, [](int i) { return i; }, op, rh_scatter_tag);
  finish_range(acc + own.offset, own.count, op, p);
  if (own.count > 0) std::memcpy(static_cast<void*>(out), acc + own.offset, own.count * sizeof(T));
}

/// Allgather into `out` (`count` elements): rank r contributes piece r in
/// `in` (may alias that piece of `out`). p must be a power of two.
template <class T>
void doubling_allgather(transport& t, const T* in, T* out, std::size_t count) {
  const int p = t.size(), r = t.rank();
  const chunk own = partition(count, p, r);
  if (own.count > 0 && in != out + own.offset) {
    std::memcpy(static_cast<void*>(out + own.offset), in, own.count * sizeof(T));
  }
  if (p == 1 || count == 0) return;
  doubling_rounds(
      t, out, count, p, r, [](int i) { return i; }, rd_gather_tag);
}

}  // namespace ringflow::detail
