// Compiles the non-ring allreduce algorithms once for every element type and
// reduce op (a separate file from the ring's so the two build in parallel).
#include "ringflow/coll/collectives.hpp"

#define RINGFLOW_ALGOS_INSTANTIATE(T, OP)                                                       \
  template void ringflow::detail::recursive_doubling_allreduce<T, ringflow::OP>(                \
      ringflow::transport&, const T*, T*, std::size_t, const ringflow::OP&);                    \
  template void ringflow::detail::halving_doubling_allreduce<T, ringflow::OP>(                  \
      ringflow::transport&, const T*, T*, std::size_t, const ringflow::OP&);                    \
  template void ringflow::detail::tree_allreduce<T, ringflow::OP>(                              \
      ringflow::transport&, const T*, T*, std::size_t, const ringflow::OP&, std::size_t, int);  \
  template void ringflow::detail::hierarchical_allreduce<T, ringflow::OP>(                      \
      ringflow::transport&, const T*, T*, std::size_t, const ringflow::OP&,                     \
      const ringflow::topology&, std::size_t);
#define RINGFLOW_ALGOS_INSTANTIATE_ALL_OPS(T) \
  RINGFLOW_ALGOS_INSTANTIATE(T, sum_op)       \
  RINGFLOW_ALGOS_INSTANTIATE(T, prod_op)      \
  RINGFLOW_ALGOS_INSTANTIATE(T, min_op)       \
  RINGFLOW_ALGOS_INSTANTIATE(T, max_op)       \
  RINGFLOW_ALGOS_INSTANTIATE(T, avg_op)

RINGFLOW_ALGOS_INSTANTIATE_ALL_OPS(float)
RINGFLOW_ALGOS_INSTANTIATE_ALL_OPS(double)
RINGFLOW_ALGOS_INSTANTIATE_ALL_OPS(std::int8_t)
RINGFLOW_ALGOS_INSTANTIATE_ALL_OPS(std::uint8_t)
RINGFLOW_ALGOS_INSTANTIATE_ALL_OPS(std::int32_t)
RINGFLOW_ALGOS_INSTANTIATE_ALL_OPS(std::int64_t)
RINGFLOW_ALGOS_INSTANTIATE_ALL_OPS(ringflow::half)
RINGFLOW_ALGOS_INSTANTIATE_ALL_OPS(ringflow::bfloat16)
