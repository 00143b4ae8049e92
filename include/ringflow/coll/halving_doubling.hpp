// Rabenseifner's halving-doubling allreduce: a reduce-scatter by recursive
// halving (round k: swap half of the current window with the partner whose
// folded index differs in bit log2(q)-1-k, keep and reduce the other half),
// then an allgather by recursive doubling (the same exchanges in reverse,
// copying). Ring-like bandwidth (each rank moves 2(q-1)/q of the buffer) in
// 2*log2(q) messages instead of the ring's 2(p-1).
//
// Non-power-of-two p is handled explicitly by the fold of fold.hpp: the first
// 2*(p - q) ranks pair up, the even one sends its whole buffer to the odd one
// before and receives the result after; the cost is two whole-buffer messages
// on those ranks, which the cost model charges.
//
// Determinism: block b is reduced only by folded rank b (combining the lower
// window's partial first), finished there, and copied everywhere else.
#pragma once

#include <cstddef>
#include <cstring>

#include "ringflow/coll/fold.hpp"
#include "ringflow/coll/partition.hpp"
#include "ringflow/coll/recursive_halving.hpp"
#include "ringflow/coll/ring.hpp"
#include "ringflow/comm/transport.hpp"

namespace ringflow::detail {

inline constexpr int halving_tag = collective_tag_base + 41;
inline constexpr int doubling_tag = collective_tag_base + 42;
inline constexpr int hd_fold_tag = collective_tag_base + 43;

/// Halving-doubling allreduce of `count` elements from `in` into `out` (may alias).
template <class T, class Op>
void halving_doubling_allreduce(transport& t, const T* in, T* out, std::size_t count,
                                const Op& op) {
  const int p = t.size(), r = t.rank();
  if (count == 0) return;
  const std::size_t bytes = count * sizeof(T);
  if (p == 1) return single_rank_result(in, out, count, op);
  const fold_map fold(p);
  const int q = fold.q;
  const int me = fold.folded(r);
  T* incoming = scratch<T>(count, 0);
  // Where this rank's partial result lives: the input until the first
  // combine writes `out` (so out-of-place calls need no initial copy).
  const T* src = in;
  if (r < 2 * fold.rem) {
    if (me < 0) {
      t.isend(in, bytes, r + 1, hd_fold_tag).wait();
      t.irecv(out, bytes, r + 1, hd_fold_tag).wait();
      return;
    }
    t.irecv(incoming, bytes, r - 1, hd_fold_tag).wait();
    combine_to(out, static_cast<const T*>(incoming), in, count, op);
    src = out;
  }
  // Block b (of q) ends up reduced on folded rank b (the rounds are
  // recursive_halving.hpp's, over the folded indices).
  auto rank_of = [&fold](int f) { return fold.rank_of(f); };
  halving_rounds(t, src, out, incoming, count, q, me, rank_of, op, halving_tag);
  const chunk own = piece_range(count, q, me, me + 1);
  finish_range(out + own.offset, own.count, op, p);
  doubling_rounds(t, out, count, q, me, rank_of, doubling_tag);
  if (r < 2 * fold.rem) t.isend(out, bytes, r - 1, hd_fold_tag).wait();
}

}  // namespace ringflow::detail
