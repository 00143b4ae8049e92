// From a run-time element type (and reduce op) to a template: the one place
// that lists which C++ type each dtype tag means. Type-erased entry points
// (the shm backend, the CUDA glue, the bench, tests) call their templates
// through these instead of writing the switch again.
//
//   ringflow::visit_dtype(type, [&]<class T>(ringflow::type_tag<T>) { run<T>(...); });
//   ringflow::visit_dtype_op(type, op, [&]<class T, class Op>(ringflow::type_tag<T>, Op) {
//     reduce<T>(dst, a, b, n, Op{});
//   });
//
// Both return what the function returns (every branch must return the same
// type), and throw usage_error for a value outside the enum (a corrupt tag
// read from a file or the wire), naming the value.
#pragma once

#include <cstdint>
#include <string>

#include "ringflow/core/dtype.hpp"
#include "ringflow/core/error.hpp"
#include "ringflow/core/reduce_op.hpp"

namespace ringflow {

/// Names an element type as a value: f(type_tag<T>{}).
template <class T>
struct type_tag {
  using type = T;
};

/// Calls f(type_tag<T>{}) for the element type `t` names.
template <class F>
decltype(auto) visit_dtype(dtype t, F&& f) {
  switch (t) {
    case dtype::f32: return f(type_tag<float>{});
    case dtype::f64: return f(type_tag<double>{});
    case dtype::i8: return f(type_tag<std::int8_t>{});
    case dtype::u8: return f(type_tag<std::uint8_t>{});
    case dtype::i32: return f(type_tag<std::int32_t>{});
    case dtype::i64: return f(type_tag<std::int64_t>{});
    case dtype::f16: return f(type_tag<half>{});
    case dtype::bf16: return f(type_tag<bfloat16>{});
  }
  throw usage_error("unknown element type tag " + std::to_string(static_cast<int>(t)));
}

/// Calls f(Op{}) for the reduce op `k` names (sum_op, prod_op, ...).
template <class F>
decltype(auto) visit_op(op_kind k, F&& f) {
  switch (k) {
    case op_kind::sum: return f(sum_op{});
    case op_kind::prod: return f(prod_op{});
    case op_kind::min: return f(min_op{});
    case op_kind::max: return f(max_op{});
    case op_kind::avg: return f(avg_op{});
  }
  throw usage_error("unknown reduce op tag " + std::to_string(static_cast<int>(k)));
}

/// Calls f(type_tag<T>{}, Op{}) for the element type and reduce op named.
template <class F>
decltype(auto) visit_dtype_op(dtype t, op_kind k, F&& f) {
  return visit_dtype(t, [&](auto tag) -> decltype(auto) {
    return visit_op(k, [&](auto op) -> decltype(auto) { return f(tag, op); });
  });
}

}  // namespace ringflow
