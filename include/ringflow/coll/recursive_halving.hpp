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
  const T* src = in;  // the input until the first combine writes acc
  int lo = 0, hi = p;
  for (int mask = p / 2; mask >= 1; mask >>= 1) {
    const int peer = r ^ mask;
    const int mid = lo + mask;
    const bool lower = (r & mask) == 0;
    const chunk keep = lower ? piece_range(count, p, lo, mid) : piece_range(count, p, mid, hi);
    const chunk give = lower ? piece_range(count, p, mid, hi) : piece_range(count, p, lo, mid);
    request rq = t.irecv(incoming, keep.count * sizeof(T), peer, rh_scatter_tag);
    request sq = t.isend(src + give.offset, give.count * sizeof(T), peer, rh_scatter_tag);
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
  // Round k: swap the aligned window of 2^k pieces this rank holds with the
  // partner's, doubling both.
  for (int mask = 1; mask < p; mask <<= 1) {
    const int peer = r ^ mask;
    const int mine0 = r & ~(mask - 1), theirs0 = peer & ~(mask - 1);
    const chunk mine = piece_range(count, p, mine0, mine0 + mask);
    const chunk theirs = piece_range(count, p, theirs0, theirs0 + mask);
    request rq = t.irecv(out + theirs.offset, theirs.count * sizeof(T), peer, rd_gather_tag);
    request sq = t.isend(out + mine.offset, mine.count * sizeof(T), peer, rd_gather_tag);
    rq.wait();
    sq.wait();
  }
}

}  // namespace ringflow::detail
