// The public collectives: allreduce, reduce_scatter, allgather, broadcast,
// barrier. They validate arguments, run the checked-mode fingerprint
// comparison, and dispatch to an algorithm.
#pragma once

#include <fmt/format.h>

#include <chrono>
#include <span>
#include <type_traits>

#include "ringflow/coll/broadcast.hpp"
#include "ringflow/coll/context.hpp"
#include "ringflow/coll/fingerprint.hpp"
#include "ringflow/coll/halving_doubling.hpp"
#include "ringflow/coll/hierarchical.hpp"
#include "ringflow/coll/options.hpp"
#include "ringflow/coll/partition.hpp"
#include "ringflow/coll/recursive_doubling.hpp"
#include "ringflow/coll/recursive_halving.hpp"
#include "ringflow/coll/registry.hpp"
#include "ringflow/coll/ring.hpp"
#include "ringflow/coll/tree.hpp"
#include "ringflow/comm/communicator.hpp"
#include "ringflow/core/dtype.hpp"
#include "ringflow/core/error.hpp"
#include "ringflow/core/reduce_op.hpp"

namespace ringflow {

namespace detail {
inline std::size_t segment_or_default(const coll_options& o) {
  return o.segment_bytes ? o.segment_bytes : default_segment_bytes;
}

/// Runs allreduce algorithm `a` (not automatic); `opt` is what the caller
/// asked for (automatic lets a declining shm fall back).
template <class T, class Op>
void run_allreduce_with(algo a, const communicator& comm, const T* in, T* out, std::size_t count,
                        const Op& op, const coll_options& opt) {
  transport& t = comm.raw();
  note_algorithm(comm, algo_name(a == algo::automatic ? algo::ring : a));
  switch (a) {
    case algo::automatic:
    case algo::ring:
      ring_allreduce(t, in, out, count, op, segment_or_default(opt));
      return;
    case algo::native:
      if (!t.native_allreduce(in, out, count, dtype_of<T>, Op::kind)) {
        throw not_supported_error(fmt::format(
            "allreduce on rank {}: the '{}' backend has no native allreduce for {} {}; use "
            "algo::ring",
            comm.rank(), comm.backend(), dtype_name(dtype_of<T>), op_name(Op::kind)));
      }
      if constexpr (Op::kind == op_kind::avg) finish_range(out, count, op, comm.size());
      return;
    case algo::recursive_doubling:
      recursive_doubling_allreduce(t, in, out, count, op);
      return;
    case algo::halving_doubling:
      halving_doubling_allreduce(t, in, out, count, op);
      return;
    case algo::tree:
      tree_allreduce(t, in, out, count, op, opt.segment_bytes, 1);
      return;
    case algo::double_tree:
      tree_allreduce(t, in, out, count, op, opt.segment_bytes, 2);
      return;
    case algo::hierarchical:
      if (count == 0) return;
      hierarchical_allreduce(t, in, out, count, op, context_of(comm)->topo,
                             opt.segment_bytes);
      return;
    case algo::shm: {
      const allreduce_fn fn = registered_algorithm(algo::shm);
      if (fn == nullptr) {
        throw not_supported_error(fmt::format(
            "allreduce on rank {}: algo::shm is not available: no shared-memory allreduce is "
            "registered (build and link ringflow's shm backend, or use another algorithm)",
            comm.rank()));
      }
      if (!fn(comm, out, in, count, dtype_of<T>, Op::kind)) {
        if (opt.algorithm == algo::automatic) {
          // Declined on every rank alike before touching data (e.g. the
          // segment could not be set up): automatic picks again without shm.
          const algo next = automatic_after_shm_declined(comm, count * sizeof(T));
          run_allreduce_with(next, comm, in, out, count, op, opt);
          return;
        }
        throw not_supported_error(fmt::format(
            "allreduce on rank {}: algo::shm cannot serve this call ({} {} x {} on {} ranks; are "
            "all ranks on one node?); use another algorithm",
            comm.rank(), dtype_name(dtype_of<T>), op_name(Op::kind), count, comm.size()));
      }
      return;
    }
  }
  throw usage_error(fmt::format("allreduce on rank {}: unknown algorithm {}", comm.rank(),
                                static_cast<int>(a)));
}

/// Runs the allreduce algorithm `opt` names (after the argument checks);
/// automatic asks the table, first-use tuning or the model, and times the
/// call when it is one of first-use tuning's trials. Call it after
/// begin_collective.
template <class T, class Op>
void run_allreduce(const communicator& comm, const T* in, T* out, std::size_t count, const Op& op,
                   const coll_options& opt) {
  if (opt.algorithm != algo::automatic || comm.size() == 1 || count == 0) {
    // One rank or nothing to do: no need to consult (or exchange) the model.
    const algo a = opt.algorithm == algo::automatic ? algo::ring : opt.algorithm;
    run_allreduce_with(a, comm, in, out, count, op, opt);
    return;
  }
  const automatic_pick pick = automatic_allreduce_pick(comm, count * sizeof(T));
  if (!pick.timed) {
    run_allreduce_with(pick.algorithm, comm, in, out, count, op, opt);
    return;
  }
  const auto t0 = std::chrono::steady_clock::now();
  run_allreduce_with(pick.algorithm, comm, in, out, count, op, opt);
  automatic_trial_done(pick, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
}

/// What reduce_scatter and allgather run for `opt`: the ring (automatic and
/// ring), or with algo::halving_doubling (allgather: also
/// recursive_doubling) recursive halving / doubling when the rank count is
/// a power of two and the ring otherwise (documented in
/// docs/collectives.md). Any other algorithm is an error rather than a
/// silent substitution.
inline bool use_recursive(const communicator& comm, const coll_options& opt, const char* what,
                          bool gather) {
  const algo a = opt.algorithm;
  const bool recursive =
      a == algo::halving_doubling || (gather && a == algo::recursive_doubling);
  if (a != algo::automatic && a != algo::ring && !recursive) {
    throw not_supported_error(fmt::format(
        "{} on rank {}: algo::{} is only available for allreduce; use algo::ring, "
        "algo::halving_doubling{} or algo::automatic",
        what, comm.rank(), algo_name(a), gather ? ", algo::recursive_doubling" : ""));
  }
  return recursive && recursive_halving_fits(comm.size());
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
  detail::collective_scope scope(comm);
  detail::run_allreduce(comm, in.data(), out.data(), in.size(), op, opt);
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
/// opt.algorithm: ring (automatic) or halving_doubling (recursive halving,
/// log2 p messages; power-of-two rank counts, the ring otherwise).
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
  const bool recursive = detail::use_recursive(comm, opt, "reduce_scatter", false);
  detail::begin_collective(comm, coll_kind::reduce_scatter, dtype_of<T>, Op::kind, in.size());
  detail::collective_scope scope(comm);
  detail::note_algorithm(comm, algo_name(recursive ? algo::halving_doubling : algo::ring));
  if (recursive) {
    detail::halving_reduce_scatter(comm.raw(), in.data(), out.data(), in.size(), op);
    return;
  }
  detail::ring_reduce_scatter(comm.raw(), in.data(), out.data(), in.size(), op,
                              detail::segment_or_default(opt));
}

/// Allgather: rank r contributes piece r (partition(out.size(), size, r)) in
/// `in`; every rank receives all of `out`. `in` may alias its piece of `out`.
/// opt.algorithm: ring (automatic) or halving_doubling / recursive_doubling
/// (recursive doubling, log2 p messages; power-of-two rank counts, the ring
/// otherwise).
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
  const bool recursive = detail::use_recursive(comm, opt, "allgather", true);
  detail::begin_collective(comm, coll_kind::allgather, dtype_of<T>, op_kind::sum, out.size());
  detail::collective_scope scope(comm);
  detail::note_algorithm(comm, algo_name(recursive ? algo::recursive_doubling : algo::ring));
  if (recursive) {
    detail::doubling_allgather(comm.raw(), in.data(), out.data(), out.size());
    return;
  }
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
  detail::collective_scope scope(comm);
  detail::note_algorithm(comm, data.size_bytes() <= detail::bcast_tree_max_bytes
                                   ? "binomial_tree"
                                   : "chain");
  detail::broadcast_bytes(comm.raw(), data.data(), data.size_bytes(), root,
                          detail::segment_or_default(opt));
}

/// Blocks until every rank of `comm` has entered the barrier.
inline void barrier(const communicator& comm) {
  detail::begin_collective(comm, coll_kind::barrier, dtype::u8, op_kind::sum, 0);
  detail::collective_scope scope(comm);
  detail::note_algorithm(comm, "dissemination");
  detail::dissemination_barrier(comm.raw());
}

}  // namespace ringflow

// The common instantiations are compiled once in src/coll/instantiate.cpp.
#define RINGFLOW_RING_EXTERN(T, OP)                                                             \
  extern template void ringflow::detail::ring_allreduce<T, ringflow::OP>(                       \
      ringflow::transport&, const T*, T*, std::size_t, const ringflow::OP&, std::size_t);       \
  extern template void ringflow::detail::ring_reduce_scatter<T, ringflow::OP>(                  \
      ringflow::transport&, const T*, T*, std::size_t, const ringflow::OP&, std::size_t);
#define RINGFLOW_ALGOS_EXTERN(T, OP)                                                            \
  extern template void ringflow::detail::recursive_doubling_allreduce<T, ringflow::OP>(         \
      ringflow::transport&, const T*, T*, std::size_t, const ringflow::OP&);                    \
  extern template void ringflow::detail::halving_doubling_allreduce<T, ringflow::OP>(           \
      ringflow::transport&, const T*, T*, std::size_t, const ringflow::OP&);                    \
  extern template void ringflow::detail::tree_allreduce<T, ringflow::OP>(                       \
      ringflow::transport&, const T*, T*, std::size_t, const ringflow::OP&, std::size_t, int);  \
  extern template void ringflow::detail::hierarchical_allreduce<T, ringflow::OP>(               \
      ringflow::transport&, const T*, T*, std::size_t, const ringflow::OP&,                     \
      const ringflow::topology&, std::size_t);
#define RINGFLOW_RING_EXTERN_ALL_OPS(T) \
  RINGFLOW_RING_EXTERN(T, sum_op)       \
  RINGFLOW_RING_EXTERN(T, prod_op)      \
  RINGFLOW_RING_EXTERN(T, min_op)       \
  RINGFLOW_RING_EXTERN(T, max_op)       \
  RINGFLOW_RING_EXTERN(T, avg_op)       \
  RINGFLOW_ALGOS_EXTERN(T, sum_op)      \
  RINGFLOW_ALGOS_EXTERN(T, prod_op)     \
  RINGFLOW_ALGOS_EXTERN(T, min_op)      \
  RINGFLOW_ALGOS_EXTERN(T, max_op)      \
  RINGFLOW_ALGOS_EXTERN(T, avg_op)
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
#undef RINGFLOW_ALGOS_EXTERN
