// Recursive-doubling allreduce: log2(p) rounds; in round k every rank swaps
// its whole partial result with the rank whose folded index differs in bit k
// and combines. Few messages (log2 p) but each carries the whole buffer, so
// it wins for small buffers, where latency dominates.
//
// Non-power-of-two p: the fold of fold.hpp (two extra messages of the whole
// buffer for the first 2*(p - q) ranks).
//
// Determinism: in round k both partners compute op(lower half, upper half)
// from identical operands. That alone does not give identical bits: the two
// partners run different inlined copies of the loop (one writes over its
// lower operand, the other over its upper one) and the compiler may take
// the operands of + and * in either order, which decides the payload of
// NaN + NaN. So the rounds combine with combine_symmetric (fold.hpp): a NaN
// result of sum, prod or avg is the canonical quiet NaN, and every other
// result is order-free; min/max keep the written order (lower partial
// first). Every rank then holds the same bits after each round; folded
// indices increase with rank, so the order is fixed run to run.
#pragma once

#include <cstddef>
#include <cstring>

#include "ringflow/coll/fold.hpp"
#include "ringflow/coll/ring.hpp"
#include "ringflow/comm/transport.hpp"

namespace ringflow::detail {

inline constexpr int recursive_doubling_tag = collective_tag_base + 40;

/// Recursive-doubling allreduce of `count` elements from `in` into `out` (may alias).
template <class T, class Op>
void recursive_doubling_allreduce(transport& t, const T* in, T* out, std::size_t count,
                                  const Op& op) {
  const int p = t.size(), r = t.rank();
  if (count == 0) return;
  const std::size_t bytes = count * sizeof(T);
  if (p == 1) return single_rank_result(in, out, count, op);
  constexpr int tag = recursive_doubling_tag;
  const fold_map fold(p);
  const int me = fold.folded(r);
  T* incoming = scratch<T>(count, 0);
  if (r < 2 * fold.rem) {
    if (me < 0) {
      // Sits out: the odd neighbour reduces for both and returns the result.
      t.isend(in, bytes, r + 1, tag).wait();
      t.irecv(out, bytes, r + 1, tag).wait();
      return;
    }
    t.irecv(incoming, bytes, r - 1, tag).wait();
    // One rank computes this and the even neighbour copies it, but the same
    // canonical NaN keeps the algorithm's results uniform.
    combine_symmetric(out, static_cast<const T*>(incoming), in, count, op);
  } else if (out != in) {
    std::memcpy(static_cast<void*>(out), in, bytes);
  }
  for (int mask = 1; mask < fold.q; mask <<= 1) {
    const int other = me ^ mask;
    const int peer = fold.rank_of(other);
    request rq = t.irecv(incoming, bytes, peer, tag);
    request sq = t.isend(out, bytes, peer, tag);
    rq.wait();
    sq.wait();  // out is overwritten next
    if (other < me) {
      combine_symmetric(out, static_cast<const T*>(incoming), out, count, op);
    } else {
      combine_symmetric(out, out, static_cast<const T*>(incoming), count, op);
    }
  }
  finish_range(out, count, op, p);
  if (r < 2 * fold.rem) t.isend(out, bytes, r - 1, tag).wait();
}

}  // namespace ringflow::detail
