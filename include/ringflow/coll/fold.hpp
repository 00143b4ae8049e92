// Shared by the power-of-two algorithms (recursive doubling, halving-doubling):
// the fold of a non-power-of-two rank count onto a power of two, and
// combining two partial results in a fixed order, or (for combines that
// several ranks compute redundantly) with bits that do not depend on it.
#pragma once

#include <bit>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "ringflow/core/dtype.hpp"
#include "ringflow/core/reduce_op.hpp"

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
/// source order is fixed (the lower ranks' partial first), which fixes
/// min/max of signed zeros and NaNs (selects, kept as written). It does not
/// fix which NaN payload a sum or product of two NaNs keeps: the compiler
/// treats + and * as commutative and may emit either operand first (x86
/// keeps the first one's payload), differently in the vector body and the
/// scalar tail and per inlined copy. So this is for an element that one rank
/// computes and others copy; see combine_symmetric for redundant ones.
template <class T, class Op>
inline void combine_to(T* dst, const T* lo, const T* hi, std::size_t n, const Op& op) {
  for (std::size_t i = 0; i < n; ++i) dst[i] = op(lo[i], hi[i]);
}

/// The canonical quiet NaN of a floating element type: sign clear, only the
/// quiet bit set (what std::numeric_limits<T>::quiet_NaN() gives).
template <class T>
inline T canonical_nan() {
  if constexpr (std::is_same_v<T, half>) {
    return half::from_bits(0x7e00u);
  } else if constexpr (std::is_same_v<T, bfloat16>) {
    return bfloat16::from_bits(0x7fc0u);
  } else if constexpr (std::is_same_v<T, float>) {
    return std::bit_cast<float>(std::uint32_t{0x7fc00000u});
  } else {
    return std::bit_cast<double>(std::uint64_t{0x7ff8000000000000ull});
  }
}

template <class T>
inline bool is_nan_bits(T v) {
  if constexpr (std::is_same_v<T, half>) {
    return (v.bits & 0x7fffu) > 0x7c00u;
  } else if constexpr (std::is_same_v<T, bfloat16>) {
    return (v.bits & 0x7fffu) > 0x7f80u;
  } else {
    return v != v;
  }
}

/// Does op(a, b) need its NaN results made canonical to be independent of
/// the operand order the compiled code uses? Floating sum, prod and avg do
/// (their only asymmetry: which of two NaNs survives); min and max are
/// selects whose written order the compiler keeps; integers are exact.
template <class T, class Op>
inline constexpr bool nan_order_sensitive =
    dtype_traits<T>::is_floating&& Op::kind != op_kind::min&& Op::kind != op_kind::max;

/// dst[i] = op(lo[i], hi[i]) with bits that do not depend on how the
/// compiled loop orders the operands: a NaN result of sum, prod or avg is
/// canonical_nan<T>() (all other results of IEEE + and * are commutative
/// bit for bit, signed zeros included). For combines that two ranks compute
/// redundantly from the same operands (recursive doubling), where each rank
/// runs a different inlined copy, aliasing and alignment, and so possibly
/// another operand order. dst may alias lo or hi (same index).
template <class T, class Op>
inline void combine_symmetric(T* dst, const T* lo, const T* hi, std::size_t n, const Op& op) {
  if constexpr (nan_order_sensitive<T, Op>) {
    const T nan = canonical_nan<T>();
    for (std::size_t i = 0; i < n; ++i) {
      const T v = op(lo[i], hi[i]);
      dst[i] = is_nan_bits(v) ? nan : v;
    }
  } else {
    combine_to(dst, lo, hi, n, op);
  }
}

}  // namespace ringflow::detail
