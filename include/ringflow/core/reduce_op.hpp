// Reduce operations: sum, prod, min, max, avg, as stateless functors.
//
// Each op is a tag type with a binary `operator()` usable on host and device.
// half and bfloat16 are combined in float and rounded back after every step,
// which is what a reduction over the wire of that type does.
//
// avg is sum followed by one division by the number of ranks, done once by the
// rank that owns the finished chunk (so every rank gets the same bits). For
// floating types the result is round(round(sum) / n); for integer types the
// division truncates toward zero, like C++ integer division.
#pragma once

#include <cstdint>
#include <string_view>

#include "ringflow/core/config.hpp"
#include "ringflow/core/dtype.hpp"

namespace ringflow {

/// Run-time tag of a reduce op; travels in fingerprints and bench output.
enum class op_kind : std::uint8_t { sum, prod, min, max, avg };

constexpr std::string_view op_name(op_kind k) {
  switch (k) {
    case op_kind::sum: return "sum";
    case op_kind::prod: return "prod";
    case op_kind::min: return "min";
    case op_kind::max: return "max";
    case op_kind::avg: return "avg";
  }
  return "unknown";
}

namespace detail {
// The type arithmetic happens in: float for the 16-bit floats, T otherwise.
template <class T>
struct compute_type {
  using type = T;
};
template <>
struct compute_type<half> {
  using type = float;
};
template <>
struct compute_type<bfloat16> {
  using type = float;
};
template <class T>
using compute_t = typename compute_type<T>::type;
}  // namespace detail

struct sum_op {
  static constexpr op_kind kind = op_kind::sum;
  template <class T>
  RINGFLOW_HOST_DEVICE T operator()(T a, T b) const {
    using C = detail::compute_t<T>;
    return static_cast<T>(static_cast<C>(a) + static_cast<C>(b));
  }
};

struct prod_op {
  static constexpr op_kind kind = op_kind::prod;
  template <class T>
  RINGFLOW_HOST_DEVICE T operator()(T a, T b) const {
    using C = detail::compute_t<T>;
    return static_cast<T>(static_cast<C>(a) * static_cast<C>(b));
  }
};

// min/max propagate NaN (a NaN input makes a NaN result), like torch and NCCL,
// so a diverged rank cannot hide behind a healthy one.
struct min_op {
  static constexpr op_kind kind = op_kind::min;
  template <class T>
  RINGFLOW_HOST_DEVICE T operator()(T a, T b) const {
    using C = detail::compute_t<T>;
    const C x = static_cast<C>(a), y = static_cast<C>(b);
    if (x != x) return a;
    if (y != y) return b;
    return y < x ? b : a;
  }
};

struct max_op {
  static constexpr op_kind kind = op_kind::max;
  template <class T>
  RINGFLOW_HOST_DEVICE T operator()(T a, T b) const {
    using C = detail::compute_t<T>;
    const C x = static_cast<C>(a), y = static_cast<C>(b);
    if (x != x) return a;
    if (y != y) return b;
    return x < y ? b : a;
  }
};

/// Sum across ranks, then divide by the rank count (see the file comment).
struct avg_op : sum_op {
  static constexpr op_kind kind = op_kind::avg;
  template <class T>
  RINGFLOW_HOST_DEVICE T finish(T a, int n) const {
    using C = detail::compute_t<T>;
    return static_cast<T>(static_cast<C>(a) / static_cast<C>(n));
  }
};

/// A reduce op: a functor with a `kind`.
template <class Op>
concept reduce_op = requires {
  Op::kind;
};

inline constexpr sum_op sum{};
inline constexpr prod_op prod{};
inline constexpr min_op min{};
inline constexpr max_op max{};
inline constexpr avg_op avg{};

/// Applies the final step of an op to a finished value (identity except avg).
template <class Op, class T>
RINGFLOW_HOST_DEVICE T finish(const Op& op, T v, int nranks) {
  if constexpr (Op::kind == op_kind::avg) {
    return op.finish(v, nranks);
  } else {
    (void)op;
    (void)nranks;
    return v;
  }
}

}  // namespace ringflow
