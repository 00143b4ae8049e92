// Compiles alltoall, gather, scatter, reduce and the uneven ("v") collectives
// once for every element type (and reduce op, where they reduce).
#include "ringflow/coll/collectives.hpp"

#define RINGFLOW_MOVE_INSTANTIATE(T)                                                             \
  template void ringflow::detail::pairwise_alltoallv<T>(                                         \
      ringflow::transport&, const T*, const std::size_t*, const std::size_t*, T*,                \
      const std::size_t*, const std::size_t*);                                                   \
  template void ringflow::detail::pairwise_alltoall<T>(ringflow::transport&, const T*, T*,       \
                                                       std::size_t);                             \
  template void ringflow::detail::bruck_alltoall<T>(ringflow::transport&, const T*, T*,          \
                                                    std::size_t);                                \
  template void ringflow::detail::linear_gatherv<T>(ringflow::transport&, const T*, std::size_t, \
                                                    T*, const std::size_t*, const std::size_t*,  \
                                                    int);                                        \
  template void ringflow::detail::linear_scatterv<T>(ringflow::transport&, const T*,             \
                                                     const std::size_t*, const std::size_t*, T*, \
                                                     std::size_t, int);                          \
  template void ringflow::detail::ring_allgatherv<T>(ringflow::transport&, const T*, T*,         \
                                                     const std::size_t*, const std::size_t*);
#define RINGFLOW_REDUCE_INSTANTIATE(T, OP)                                                     \
  template void ringflow::detail::tree_reduce<T, ringflow::OP>(                                \
      ringflow::transport&, const T*, T*, std::size_t, const ringflow::OP&, int);              \
  template void ringflow::detail::ring_reduce<T, ringflow::OP>(                                \
      ringflow::transport&, const T*, T*, std::size_t, const ringflow::OP&, int, std::size_t); \
  template void ringflow::detail::ring_reduce_scatter_v<T, ringflow::OP>(                      \
      ringflow::transport&, const T*, T*, const std::size_t*, const std::size_t*,              \
      const ringflow::OP&);
#define RINGFLOW_COLL_INSTANTIATE(T)      \
  RINGFLOW_MOVE_INSTANTIATE(T)            \
  RINGFLOW_REDUCE_INSTANTIATE(T, sum_op)  \
  RINGFLOW_REDUCE_INSTANTIATE(T, prod_op) \
  RINGFLOW_REDUCE_INSTANTIATE(T, min_op)  \
  RINGFLOW_REDUCE_INSTANTIATE(T, max_op)  \
  RINGFLOW_REDUCE_INSTANTIATE(T, avg_op)

RINGFLOW_COLL_INSTANTIATE(float)
RINGFLOW_COLL_INSTANTIATE(double)
RINGFLOW_COLL_INSTANTIATE(std::int8_t)
RINGFLOW_COLL_INSTANTIATE(std::uint8_t)
RINGFLOW_COLL_INSTANTIATE(std::int32_t)
RINGFLOW_COLL_INSTANTIATE(std::int64_t)
RINGFLOW_COLL_INSTANTIATE(ringflow::half)
RINGFLOW_COLL_INSTANTIATE(ringflow::bfloat16)
