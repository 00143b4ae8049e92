// Private helpers of the host glue in src/cuda/: calling a template with the
// element type and reduce op a type-erased entry point was given, and the
// byte-level overlap test of two buffers. One copy for nccl.cpp and ring.cpp.
#pragma once

#include <cstddef>
#include <cstdint>

#include "ringflow/coll/collectives.hpp"
#include "ringflow/core/dtype.hpp"
#include "ringflow/core/error.hpp"
#include "ringflow/core/reduce_op.hpp"

namespace ringflow::cuda::detail {

/// Runs f.template operator()<T>() for the run-time element type.
template <class F>
void with_type(dtype type, F&& f) {
  switch (type) {
    case dtype::f32: return f.template operator()<float>();
    case dtype::f64: return f.template operator()<double>();
    case dtype::i8: return f.template operator()<std::int8_t>();
    case dtype::u8: return f.template operator()<std::uint8_t>();
    case dtype::i32: return f.template operator()<std::int32_t>();
    case dtype::i64: return f.template operator()<std::int64_t>();
    case dtype::f16: return f.template operator()<half>();
    case dtype::bf16: return f.template operator()<bfloat16>();
  }
  throw usage_error("ringflow::cuda: unknown dtype");
}

/// Runs f.template operator()<T, Op>() for the run-time type and op.
template <class F>
void with_type_op(dtype type, op_kind op, F&& f) {
  with_type(type, [&]<class T>() {
    switch (op) {
      case op_kind::sum: return f.template operator()<T, sum_op>();
      case op_kind::prod: return f.template operator()<T, prod_op>();
      case op_kind::min: return f.template operator()<T, min_op>();
      case op_kind::max: return f.template operator()<T, max_op>();
      case op_kind::avg: return f.template operator()<T, avg_op>();
    }
    throw usage_error("ringflow::cuda: unknown reduce op");
  });
}

/// coll/collectives.hpp's overlap test, on the bytes of two buffers.
inline bool overlaps(const void* a, std::size_t na, const void* b, std::size_t nb) {
  return ::ringflow::detail::overlaps(static_cast<const std::byte*>(a), na,
                                      static_cast<const std::byte*>(b), nb);
}

}  // namespace ringflow::cuda::detail
