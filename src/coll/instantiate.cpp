// Compiles the ring collectives once for every element type and reduce op,
// so users' translation units do not re-instantiate them.
#include "ringflow/coll/collectives.hpp"

#define RINGFLOW_RING_INSTANTIATE(T, OP)                                                  \
  template void ringflow::detail::ring_allreduce<T, ringflow::OP>(                        \
      ringflow::transport&, const T*, T*, std::size_t, const ringflow::OP&, std::size_t); \
  template void ringflow::detail::ring_reduce_scatter<T, ringflow::OP>(                   \
      ringflow::transport&, const T*, T*, std::size_t, const ringflow::OP&, std::size_t);
#define RINGFLOW_RING_INSTANTIATE_ALL_OPS(T) \
  RINGFLOW_RING_INSTANTIATE(T, sum_op)       \
  RINGFLOW_RING_INSTANTIATE(T, prod_op)      \
  RINGFLOW_RING_INSTANTIATE(T, min_op)       \
  RINGFLOW_RING_INSTANTIATE(T, max_op)       \
  RINGFLOW_RING_INSTANTIATE(T, avg_op)

RINGFLOW_RING_INSTANTIATE_ALL_OPS(float)
RINGFLOW_RING_INSTANTIATE_ALL_OPS(double)
RINGFLOW_RING_INSTANTIATE_ALL_OPS(std::int8_t)
RINGFLOW_RING_INSTANTIATE_ALL_OPS(std::uint8_t)
RINGFLOW_RING_INSTANTIATE_ALL_OPS(std::int32_t)
RINGFLOW_RING_INSTANTIATE_ALL_OPS(std::int64_t)
RINGFLOW_RING_INSTANTIATE_ALL_OPS(ringflow::half)
RINGFLOW_RING_INSTANTIATE_ALL_OPS(ringflow::bfloat16)
