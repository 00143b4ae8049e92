// Shared by the power-of-two algorithms (recursive doubling, halving-doubling):
// the fold of a non-power-of-two rank count onto a power of two, and
// combining two partial results in a fixed order.
#pragma once

#include <cstddef>

namespace ringflow::detail {

/// Largest power of two <= p (p >= 1).
constexpr int pow2_floor(int p) {
  int q = 1;
  while (q <= p / 2) q *= 2;
  return q;
}

/// The standard fold of p ranks onto q = pow2_floor(p): with rem = p - q,
/// the first 2*rem ranks pair up, even rank 2i hands its whole buffer to
/// 2i+1 and sits out until 2i+1 sends the result back. The q remaining ranks
/// get dense "folded" indices, increasing with the rank, so partial results
/// still combine lower ranks first.
struct fold_map {
  int p, q, rem;
  explicit constexpr fold_map(int ranks) : p(ranks), q(pow2_floor(ranks)), rem(ranks - q) {}
  /// Folded index of `rank`, or -1 for a rank that sits out.
  constexpr int folded(int rank) const {
    if (rank < 2 * rem) return rank % 2 ? rank / 2 : -1;
    return rank - rem;
  }
  /// The rank behind folded index `f`.
  constexpr int rank_of(int f) const { return f < rem ? 2 * f + 1 : f + rem; }
};

/// dst[i] = op(lo[i], hi[i]); dst may alias lo or hi (same index). The
/// operand order is fixed (the lower ranks' partial first) so min/max of
/// signed zeros and NaN payloads come out the same on every rank.
template <class T, class Op>
inline void combine_to(T* dst, const T* lo, const T* hi, std::size_t n, const Op& op) {
  for (std::size_t i = 0; i < n; ++i) dst[i] = op(lo[i], hi[i]);
}

}  // namespace ringflow::detail
