// Private helpers of the host glue in src/cuda/: the byte-level overlap test
// of two buffers (one copy for the nccl_*.cpp files and ring.cpp), and the dtype visitor
// (ringflow/core/dtype_visit.hpp) the type-erased entry points call their
// templates through.
#pragma once

#include <cstddef>
#include <cstdint>

#include "ringflow/coll/collectives.hpp"
#include "ringflow/core/dtype.hpp"
#include "ringflow/core/dtype_visit.hpp"
#include "ringflow/core/error.hpp"
#include "ringflow/core/reduce_op.hpp"

namespace ringflow::cuda::detail {

/// coll/collectives.hpp's overlap test, on the bytes of two buffers.
inline bool overlaps(const void* a, std::size_t na, const void* b, std::size_t nb) {
  return ::ringflow::detail::overlaps(static_cast<const std::byte*>(a), na,
                                      static_cast<const std::byte*>(b), nb);
}

}  // namespace ringflow::cuda::detail
