// The public collectives: allreduce, reduce_scatter, allgather, broadcast,
// barrier. They validate arguments, run the checked-mode fingerprint
// comparison, and dispatch to an algorithm.
#pragma once

#include <fmt/format.h>

#include <span>
#include <type_traits>

#include "ringflow/coll/broadcast.hpp"
#include "ringflow/coll/fingerprint.hpp"
#include "ringflow/coll/options.hpp"
#include "ringflow/coll/partition.hpp"
#include "ringflow/coll/ring.hpp"
#include "ringflow/comm/communicator.hpp"
#include "ringflow/core/dtype.hpp"
#include "ringflow/core/error.hpp"
#include "ringflow/core/reduce_op.hpp"

namespace ringflow {

namespace detail {
inline std::size_t segment_or_default(const coll_options& o) {
  return o.segment_bytes ? o.segment_bytes : default_segment_bytes;
}

template <class T>
bool overlaps(const T* a, std::size_t na, const T* b, std::size_t nb) {
  std::less<const T*> lt;
  return na && nb && lt(a, b + nb) && lt(b, a + na);
}
}  // namespace detail

/// Allreduce `in` into `out` on every rank (in and out may be the same span;
/// partial overlap is an error).
///
/// @code
/// ringflow::allreduce(comm, std::span<const float>(x), std::span(y), ringflow::sum);
/// @endcode
template <element T, reduce_op Op = sum_op>
void allreduce(const communicator& comm, std::span<const std::type_identity_t<T>> in,
               std::span<T> out, Op op = {}, coll_options opt = {}) {
  if (in.size() != out.size()) {
    throw usage_error(fmt::format("allreduce on rank {}: input has {} elements, output {}",
                                  comm.rank(), in.size(), out.size()));
  }
  if (in.data() != out.data() && detail::overlaps(in.data(), in.size(), out.data(), out.size())) {
    throw usage_error(fmt::format(
        "allreduce on rank {}: input and output overlap without being the same buffer",
        comm.rank()));
  }
  detail::begin_collective(comm, coll_kind::allreduce, dtype_of<T>, Op::kind, in.size());
  switch (opt.algorithm) {
    case algo::native:
      if (!comm.raw().native_allreduce(in.data(), out.data(), in.size(), dtype_of<T>, Op::kind)) {
        throw not_supported_error(fmt::format(
            "allreduce on rank {}: the '{}' backend has no native allreduce for {} {}; use "
            "algo::ring",
            comm.rank(), comm.backend(), dtype_name(dtype_of<T>), op_name(Op::kind)));
      }
      if constexpr (Op::kind == op_kind::avg) detail::finish_range(out.data(), out.size(), op, comm.size());
      return;
    case algo::automatic:
    case algo::ring:
      detail::ring_allreduce(comm.raw(), in.data(), out.data(), in.size(), op,
                             detail::segment_or_default(opt));
      return;
  }
}

/// In-place allreduce.
///
/// @code
/// ringflow::allreduce(comm, std::span(grads), ringflow::avg);
/// ringflow::allreduce(comm, std::span(grads), ringflow::max, ringflow::algo::ring);
/// @endcode
template <element T, reduce_op Op = sum_op>
void allreduce(const communicator& comm, std::span<T> data, Op op = {},
               coll_options opt = {}) {
  allreduce<T, Op>(comm, std::span<const T>(data), data, op, opt);
}

template <element T, reduce_op Op>
void allreduce(const communicator& comm, std::span<T> data, Op op, algo a) {
  allreduce<T, Op>(comm, std::span<const T>(data), data, op, coll_options{a, 0});
}

/// Reduce-scatter: `in` holds `count` elements on every rank; rank r receives
/// the reduction of piece r (see partition()) in `out`, whose size must be
/// partition(count, size, r).count. `out` may alias that piece of `in`.
template <element T, reduce_op Op = sum_op>
void reduce_scatter(const communicator& comm, std::span<const std::type_identity_t<T>> in,
                    std::span<T> out, Op op = {}, coll_options opt = {}) {
  const chunk own = partition(in.size(), comm.size(), comm.rank());
  if (out.size() != own.count) {
    throw usage_error(fmt::format(
        "reduce_scatter on rank {}: output has {} elements but piece {} of {} elements over {} "
        "ranks has {} (see ringflow::partition)",
        comm.rank(), out.size(), comm.rank(), in.size(), comm.size(), own.count));
  }
  if (opt.algorithm == algo::native) {
    throw not_supported_error("reduce_scatter: algo::native is only available for allreduce");
  }
  detail::begin_collective(comm, coll_kind::reduce_scatter, dtype_of<T>, Op::kind, in.size());
  detail::ring_reduce_scatter(comm.raw(), in.data(), out.data(), in.size(), op,
                              detail::segment_or_default(opt));
}

/// Allgather: rank r contributes piece r (partition(out.size(), size, r)) in
/// `in`; every rank receives all of `out`. `in` may alias its piece of `out`.
template <element T>
void allgather(const communicator& comm, std::span<const std::type_identity_t<T>> in,
               std::span<T> out, coll_options opt = {}) {
  const chunk own = partition(out.size(), comm.size(), comm.rank());
  if (in.size() != own.count) {
    throw usage_error(fmt::format(
        "allgather on rank {}: input has {} elements but piece {} of {} elements over {} ranks "
        "has {} (see ringflow::partition)",
        comm.rank(), in.size(), comm.rank(), out.size(), comm.size(), own.count));
  }
  if (opt.algorithm == algo::native) {
    throw not_supported_error("allgather: algo::native is only available for allreduce");
  }
  detail::begin_collective(comm, coll_kind::allgather, dtype_of<T>, op_kind::sum, out.size());
  detail::ring_allgather(comm.raw(), in.data(), out.data(), out.size(),
                         detail::segment_or_default(opt));
}

/// Broadcast `data` from `root` to every rank (same size everywhere).
template <element T>
void broadcast(const communicator& comm, std::span<T> data, int root, coll_options opt = {}) {
  if (root < 0 || root >= comm.size()) {
    throw usage_error(fmt::format("broadcast on rank {}: root {} is outside [0, {})", comm.rank(),
                                  root, comm.size()));
  }
  detail::begin_collective(comm, coll_kind::broadcast, dtype_of<T>, op_kind::sum, data.size(),
                           root);
  detail::broadcast_bytes(comm.raw(), data.data(), data.size_bytes(), root,
                          detail::segment_or_default(opt));
}

/// Blocks until every rank of `comm` has entered the barrier.
inline void barrier(const communicator& comm) {
  detail::begin_collective(comm, coll_kind::barrier, dtype::u8, op_kind::sum, 0);
  detail::dissemination_barrier(comm.raw());
}

}  // namespace ringflow

// The common instantiations are compiled once in src/coll/instantiate.cpp.
#define RINGFLOW_RING_EXTERN(T, OP)                                                             \
  extern template void ringflow::detail::ring_allreduce<T, ringflow::OP>(                       \
      ringflow::transport&, const T*, T*, std::size_t, const ringflow::OP&, std::size_t);       \
  extern template void ringflow::detail::ring_reduce_scatter<T, ringflow::OP>(                  \
      ringflow::transport&, const T*, T*, std::size_t, const ringflow::OP&, std::size_t);
#define RINGFLOW_RING_EXTERN_ALL_OPS(T) \
  RINGFLOW_RING_EXTERN(T, sum_op)       \
  RINGFLOW_RING_EXTERN(T, prod_op)      \
  RINGFLOW_RING_EXTERN(T, min_op)       \
  RINGFLOW_RING_EXTERN(T, max_op)       \
  RINGFLOW_RING_EXTERN(T, avg_op)
RINGFLOW_RING_EXTERN_ALL_OPS(float)
RINGFLOW_RING_EXTERN_ALL_OPS(double)
RINGFLOW_RING_EXTERN_ALL_OPS(std::int8_t)
RINGFLOW_RING_EXTERN_ALL_OPS(std::uint8_t)
RINGFLOW_RING_EXTERN_ALL_OPS(std::int32_t)
RINGFLOW_RING_EXTERN_ALL_OPS(std::int64_t)
RINGFLOW_RING_EXTERN_ALL_OPS(ringflow::half)
RINGFLOW_RING_EXTERN_ALL_OPS(ringflow::bfloat16)
#undef RINGFLOW_RING_EXTERN_ALL_OPS
#undef RINGFLOW_RING_EXTERN
