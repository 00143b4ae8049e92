// The public collectives: allreduce, reduce_scatter, allgather, broadcast,
// barrier, alltoall(v), gather(v), scatter(v), reduce, allgatherv and
// reduce_scatter_v. They validate arguments, run the checked-mode
// fingerprint comparison, and dispatch to an algorithm.
#pragma once

#include <fmt/format.h>

#include <chrono>
#include <cstdint>
#include <numeric>
#include <span>
#include <type_traits>
#include <vector>

#include "ringflow/coll/algorithms.hpp"
#include "ringflow/coll/alltoall.hpp"
#include "ringflow/coll/broadcast.hpp"
#include "ringflow/coll/context.hpp"
#include "ringflow/coll/fingerprint.hpp"
#include "ringflow/coll/gather_scatter.hpp"
#include "ringflow/coll/halving_doubling.hpp"
#include "ringflow/coll/hierarchical.hpp"
#include "ringflow/coll/options.hpp"
#include "ringflow/coll/partition.hpp"
#include "ringflow/coll/recursive_doubling.hpp"
#include "ringflow/coll/recursive_halving.hpp"
#include "ringflow/coll/reduce.hpp"
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
/// asked for (automatic lets a declining shm fall back). The ring, the
/// default, is called directly; the other built-in algorithms through their
/// row of the algorithm table (coll/algorithms.hpp: compiled once, in
/// src/coll/instantiate_algorithms.cpp); native and registered ones (shm)
/// through the backend.
template <class T, class Op>
void run_allreduce_with(algo a, const communicator& comm, const T* in, T* out, std::size_t count,
                        const Op& op, const coll_options& opt) {
  transport& t = comm.raw();
  if (a == algo::automatic || a == algo::ring) {
    note_algorithm(comm, algo_name(algo::ring));
    ring_allreduce(t, in, out, count, op, segment_or_default(opt));
    return;
  }
  if (static_cast<std::size_t>(a) >= algo_count) {
    throw usage_error(fmt::format("allreduce on rank {}: unknown algorithm {}", comm.rank(),
                                  static_cast<int>(a)));
  }
  note_algorithm(comm, algo_name(a));
  const algorithm_info& info = algorithm_info_of(a);
  if (info.run != nullptr) {
    info.run(comm, out, in, count, dtype_of<T>, Op::kind, opt);
    return;
  }
  if (a == algo::native) {
    if (!t.native_allreduce(in, out, count, dtype_of<T>, Op::kind)) {
      throw not_supported_error(fmt::format(
          "allreduce on rank {}: the '{}' backend has no native allreduce for {} {}; use "
          "algo::ring",
          comm.rank(), comm.backend(), dtype_name(dtype_of<T>), op_name(Op::kind)));
    }
    if constexpr (Op::kind == op_kind::avg) finish_range(out, count, op, comm.size());
    return;
  }
  const ext::allreduce_fn fn = ext::registered_algorithm(a);
  if (fn == nullptr) {
    throw not_supported_error(fmt::format(
        "allreduce on rank {}: algo::{} is not available: {}", comm.rank(), algo_name(a),
        a == algo::shm ? "no shared-memory allreduce is registered (build and link ringflow's "
                         "shm backend, or use another algorithm)"
                       : "no backend registered it"));
  }
  if (!fn(comm, out, in, count, dtype_of<T>, Op::kind)) {
    if (opt.algorithm == algo::automatic && a == algo::shm) {
      // Declined on every rank alike before touching data (e.g. the
      // segment could not be set up): automatic picks again without shm.
      const algo next = automatic_after_shm_declined(comm, count * sizeof(T));
      run_allreduce_with(next, comm, in, out, count, op, opt);
      return;
    }
    throw not_supported_error(fmt::format(
        "allreduce on rank {}: algo::{} cannot serve this call ({} {} x {} on {} ranks; are "
        "all ranks on one node?); use another algorithm",
        comm.rank(), algo_name(a), dtype_name(dtype_of<T>), op_name(Op::kind), count, comm.size()));
  }
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
  automatic_trial_done(
      pick, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
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
  const bool recursive = a == algo::halving_doubling || (gather && a == algo::recursive_doubling);
  if (a != algo::automatic && a != algo::ring && !recursive) {
    throw not_supported_error(
        fmt::format("{} on rank {}: algo::{} is only available for allreduce; use algo::ring, "
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
    throw usage_error(
        fmt::format("allreduce on rank {}: input and output overlap without being the same buffer",
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
void allreduce(const communicator& comm, std::span<T> data, Op op = {}, coll_options opt = {}) {
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
  detail::note_algorithm(
      comm, data.size_bytes() <= detail::bcast_tree_max_bytes ? "binomial_tree" : "chain");
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

// ---- alltoall, gather, scatter, reduce and the uneven ("v") collectives ----

namespace detail {
/// A 31-bit FNV-1a hash of per-rank counts: what the fingerprint of
/// allgatherv and reduce_scatter_v carries (in its root field), so ranks
/// whose count lists differ get a mismatch error, not a wrong result.
inline std::int32_t counts_hash(std::span<const std::size_t> counts) {
  std::uint64_t h = 0xcbf29ce484222325ull;
  for (std::size_t c : counts) {
    for (int b = 0; b < 8; ++b) {
      h ^= (static_cast<std::uint64_t>(c) >> (8 * b)) & 0xffu;
      h *= 0x100000001b3ull;
    }
  }
  return static_cast<std::int32_t>((h ^ (h >> 32)) & 0x7fffffffu);
}

/// Packed displacements: the prefix sums of `counts`.
inline std::vector<std::size_t> packed_displs(std::span<const std::size_t> counts) {
  std::vector<std::size_t> d(counts.size());
  std::size_t at = 0;
  for (std::size_t i = 0; i < counts.size(); ++i) d[i] = at, at += counts[i];
  return d;
}

/// Throws usage_error unless counts/displs have one entry per rank and every
/// block [displs[q], displs[q] + counts[q]) lies inside a buffer of `size`.
inline void check_blocks(const communicator& comm, const char* what, const char* which,
                         std::span<const std::size_t> counts, std::span<const std::size_t> displs,
                         std::size_t size) {
  const auto p = static_cast<std::size_t>(comm.size());
  if (counts.size() != p || displs.size() != p) {
    throw usage_error(fmt::format(
        "{} on rank {}: {} counts and displacements need one entry per rank ({}), got {} and {}",
        what, comm.rank(), which, p, counts.size(), displs.size()));
  }
  for (std::size_t q = 0; q < p; ++q) {
    if (displs[q] > size || counts[q] > size - displs[q]) {
      throw usage_error(fmt::format(
          "{} on rank {}: {} block {} ({} elements at {}) runs past the end of its buffer of {} "
          "elements",
          what, comm.rank(), which, q, counts[q], displs[q], size));
    }
  }
}

inline void check_root(const communicator& comm, const char* what, int root) {
  if (root < 0 || root >= comm.size()) {
    throw usage_error(fmt::format("{} on rank {}: root {} is outside [0, {})", what, comm.rank(),
                                  root, comm.size()));
  }
}

template <class T>
void check_disjoint(const communicator& comm, const char* what, const T* a, std::size_t na,
                    const T* b, std::size_t nb) {
  if (overlaps(a, na, b, nb)) {
    throw usage_error(fmt::format("{} on rank {}: input and output overlap", what, comm.rank()));
  }
}
}  // namespace detail

/// Alltoall: `in` holds p blocks of in.size() / p elements, block q for rank
/// q; `out` receives rank q's block for this rank as its block q. in and out
/// have the same size on every rank and must not overlap.
/// opt.algorithm: automatic (the cost model picks; the same choice on every
/// rank), pairwise or bruck (docs/collectives.md).
///
/// @code
/// std::vector<float> send(per_peer * comm.size()), recv(send.size());
/// ringflow::alltoall(comm, std::span<const float>(send), std::span(recv));
/// @endcode
template <element T>
void alltoall(const communicator& comm, std::span<const std::type_identity_t<T>> in,
              std::span<T> out, alltoall_options opt = {}) {
  const auto p = static_cast<std::size_t>(comm.size());
  if (in.size() % p != 0 || out.size() != in.size()) {
    throw usage_error(fmt::format(
        "alltoall on rank {}: input ({} elements) and output ({}) must have the same size, a "
        "multiple of the {} ranks",
        comm.rank(), in.size(), out.size(), p));
  }
  detail::check_disjoint(comm, "alltoall", in.data(), in.size(), out.data(), out.size());
  const std::size_t count = in.size() / p;
  detail::begin_collective(comm, coll_kind::alltoall, dtype_of<T>, op_kind::sum, count);
  detail::collective_scope scope(comm);
  alltoall_algo a = opt.algorithm;
  if (a == alltoall_algo::automatic) {
    if (p == 1) {
      a = alltoall_algo::pairwise;
    } else {
      const detail::comm_context* ctx =
          detail::context_of(comm);  // rank 0's model: one choice everywhere
      a = choose_alltoall(ctx->model, ctx->shape, in.size_bytes());
    }
  }
  detail::note_algorithm(comm, alltoall_algo_name(a));
  if (a == alltoall_algo::bruck) {
    detail::bruck_alltoall(comm.raw(), in.data(), out.data(), count);
  } else {
    detail::pairwise_alltoall(comm.raw(), in.data(), out.data(), count);
  }
}

/// Alltoallv: send_counts[q] elements at in + send_displs[q] go to rank q,
/// and recv_counts[q] elements from rank q land at out + recv_displs[q].
/// What rank a sends to b must match what b expects from a (else the call
/// fails with an error naming both ranks); counts may differ per rank and be
/// 0. Runs the pairwise exchange.
template <element T>
void alltoallv(const communicator& comm, std::span<const std::type_identity_t<T>> in,
               std::span<const std::size_t> send_counts, std::span<const std::size_t> send_displs,
               std::span<T> out, std::span<const std::size_t> recv_counts,
               std::span<const std::size_t> recv_displs) {
  detail::check_blocks(comm, "alltoallv", "send", send_counts, send_displs, in.size());
  detail::check_blocks(comm, "alltoallv", "receive", recv_counts, recv_displs, out.size());
  const auto r = static_cast<std::size_t>(comm.rank());
  if (send_counts[r] != recv_counts[r]) {
    throw usage_error(
        fmt::format("alltoallv on rank {}: sends {} elements to itself but expects {} from itself",
                    r, send_counts[r], recv_counts[r]));
  }
  detail::check_disjoint(comm, "alltoallv", in.data(), in.size(), out.data(), out.size());
  detail::begin_collective(comm, coll_kind::alltoallv, dtype_of<T>, op_kind::sum, 0);
  detail::collective_scope scope(comm);
  detail::note_algorithm(comm, "pairwise");
  detail::pairwise_alltoallv(comm.raw(), in.data(), send_counts.data(), send_displs.data(),
                             out.data(), recv_counts.data(), recv_displs.data());
}

/// Alltoallv with packed blocks (displacements are the prefix sums of the counts).
template <element T>
void alltoallv(const communicator& comm, std::span<const std::type_identity_t<T>> in,
               std::span<const std::size_t> send_counts, std::span<T> out,
               std::span<const std::size_t> recv_counts) {
  const auto sd = detail::packed_displs(send_counts), rd = detail::packed_displs(recv_counts);
  alltoallv<T>(comm, in, send_counts, sd, out, recv_counts, rd);
}

/// Gatherv: rank q's `in` lands at out + displs[q] on `root`, which expects
/// counts[q] elements from it. counts, displs and out are read on the root
/// only (others may pass empty spans). The root's `in` may be exactly its
/// block of `out`.
template <element T>
void gatherv(const communicator& comm, std::span<const std::type_identity_t<T>> in,
             std::span<T> out, std::span<const std::size_t> counts,
             std::span<const std::size_t> displs, int root) {
  detail::check_root(comm, "gatherv", root);
  if (comm.rank() == root) {
    detail::check_blocks(comm, "gatherv", "receive", counts, displs, out.size());
    const auto q = static_cast<std::size_t>(root);
    if (counts[q] != in.size()) {
      throw usage_error(
          fmt::format("gatherv on rank {} (the root): input has {} elements but counts[{}] is {}",
                      root, in.size(), root, counts[q]));
    }
    if (in.data() != out.data() + displs[q]) {
      detail::check_disjoint(comm, "gatherv", in.data(), in.size(), out.data(), out.size());
    }
  }
  detail::begin_collective(comm, coll_kind::gatherv, dtype_of<T>, op_kind::sum, 0, root);
  detail::collective_scope scope(comm);
  detail::note_algorithm(comm, "linear");
  detail::linear_gatherv(comm.raw(), in.data(), in.size(), out.data(), counts.data(), displs.data(),
                         root);
}

/// Gatherv with packed blocks (displacements are the prefix sums of the counts).
template <element T>
void gatherv(const communicator& comm, std::span<const std::type_identity_t<T>> in,
             std::span<T> out, std::span<const std::size_t> counts, int root) {
  const auto d = detail::packed_displs(counts);
  gatherv<T>(comm, in, out, counts, d, root);
}

/// Gather: every rank's `in` (the same size everywhere) lands on `root` as
/// block q of `out` (p * in.size() elements; read on the root only).
template <element T>
void gather(const communicator& comm, std::span<const std::type_identity_t<T>> in, std::span<T> out,
            int root) {
  detail::check_root(comm, "gather", root);
  const auto p = static_cast<std::size_t>(comm.size());
  const std::size_t count = in.size();
  if (comm.rank() == root) {
    if (out.size() != p * count) {
      throw usage_error(
          fmt::format("gather on rank {} (the root): output has {} elements, need {} ranks x {}",
                      root, out.size(), p, count));
    }
    if (in.data() != out.data() + static_cast<std::size_t>(root) * count) {
      detail::check_disjoint(comm, "gather", in.data(), in.size(), out.data(), out.size());
    }
  }
  detail::begin_collective(comm, coll_kind::gather, dtype_of<T>, op_kind::sum, count, root);
  detail::collective_scope scope(comm);
  detail::note_algorithm(comm, "linear");
  std::vector<std::size_t> counts, displs;
  if (comm.rank() == root) {
    counts.assign(p, count);
    displs = detail::packed_displs(counts);
  }
  detail::linear_gatherv(comm.raw(), in.data(), count, out.data(), counts.data(), displs.data(),
                         root);
}

/// Scatterv: counts[q] elements at in + displs[q] on `root` go to rank q's
/// `out`, whose size must match. counts, displs and in are read on the root
/// only. The root's `out` may be exactly its block of `in`.
template <element T>
void scatterv(const communicator& comm, std::span<const std::type_identity_t<T>> in,
              std::span<const std::size_t> counts, std::span<const std::size_t> displs,
              std::span<T> out, int root) {
  detail::check_root(comm, "scatterv", root);
  if (comm.rank() == root) {
    detail::check_blocks(comm, "scatterv", "send", counts, displs, in.size());
    const auto q = static_cast<std::size_t>(root);
    if (counts[q] != out.size()) {
      throw usage_error(
          fmt::format("scatterv on rank {} (the root): output has {} elements but counts[{}] is {}",
                      root, out.size(), root, counts[q]));
    }
    if (out.data() != in.data() + displs[q]) {
      detail::check_disjoint(comm, "scatterv", in.data(), in.size(), out.data(), out.size());
    }
  }
  detail::begin_collective(comm, coll_kind::scatterv, dtype_of<T>, op_kind::sum, 0, root);
  detail::collective_scope scope(comm);
  detail::note_algorithm(comm, "linear");
  detail::linear_scatterv(comm.raw(), in.data(), counts.data(), displs.data(), out.data(),
                          out.size(), root);
}

/// Scatterv with packed blocks (displacements are the prefix sums of the counts).
template <element T>
void scatterv(const communicator& comm, std::span<const std::type_identity_t<T>> in,
              std::span<const std::size_t> counts, std::span<T> out, int root) {
  const auto d = detail::packed_displs(counts);
  scatterv<T>(comm, in, counts, d, out, root);
}

/// Scatter: block q of `in` on `root` (p * out.size() elements; read on the
/// root only) goes to rank q's `out` (the same size everywhere).
template <element T>
void scatter(const communicator& comm, std::span<const std::type_identity_t<T>> in,
             std::span<T> out, int root) {
  detail::check_root(comm, "scatter", root);
  const auto p = static_cast<std::size_t>(comm.size());
  const std::size_t count = out.size();
  if (comm.rank() == root) {
    if (in.size() != p * count) {
      throw usage_error(
          fmt::format("scatter on rank {} (the root): input has {} elements, need {} ranks x {}",
                      root, in.size(), p, count));
    }
    if (out.data() != in.data() + static_cast<std::size_t>(root) * count) {
      detail::check_disjoint(comm, "scatter", in.data(), in.size(), out.data(), out.size());
    }
  }
  detail::begin_collective(comm, coll_kind::scatter, dtype_of<T>, op_kind::sum, count, root);
  detail::collective_scope scope(comm);
  detail::note_algorithm(comm, "linear");
  std::vector<std::size_t> counts, displs;
  if (comm.rank() == root) {
    counts.assign(p, count);
    displs = detail::packed_displs(counts);
  }
  detail::linear_scatterv(comm.raw(), in.data(), counts.data(), displs.data(), out.data(), count,
                          root);
}

/// Reduce: the reduction of every rank's `in` lands in `out` on `root`
/// (same size as in there; may be in; other ranks' out is not touched and
/// may be empty). opt.algorithm: automatic (the cost model picks), tree
/// (binomial tree) or ring (ring reduce-scatter, then the root gathers).
template <element T, reduce_op Op = sum_op>
void reduce(const communicator& comm, std::span<const std::type_identity_t<T>> in, std::span<T> out,
            Op op, int root, coll_options opt = {}) {
  detail::check_root(comm, "reduce", root);
  algo a = opt.algorithm;
  if (a != algo::automatic && a != algo::tree && a != algo::ring) {
    throw not_supported_error(fmt::format(
        "reduce on rank {}: algo::{} is not a reduce algorithm; use algo::tree, algo::ring or "
        "algo::automatic",
        comm.rank(), algo_name(a)));
  }
  if (comm.rank() == root) {
    if (out.size() != in.size()) {
      throw usage_error(
          fmt::format("reduce on rank {} (the root): input has {} elements, output {}", root,
                      in.size(), out.size()));
    }
    if (in.data() != out.data()) {
      detail::check_disjoint(comm, "reduce", in.data(), in.size(), out.data(), out.size());
    }
  }
  detail::begin_collective(comm, coll_kind::reduce, dtype_of<T>, Op::kind, in.size(), root);
  detail::collective_scope scope(comm);
  if (a == algo::automatic) {
    if (comm.size() == 1) {
      a = algo::tree;
    } else {
      const detail::comm_context* ctx =
          detail::context_of(comm);  // rank 0's model: one choice everywhere
      a = choose_reduce(ctx->model, ctx->shape, in.size_bytes());
    }
  }
  detail::note_algorithm(comm, algo_name(a));
  if (a == algo::ring && comm.size() > 1) {
    detail::ring_reduce(comm.raw(), in.data(), out.data(), in.size(), op, root,
                        detail::segment_or_default(opt));
  } else {
    detail::tree_reduce(comm.raw(), in.data(), out.data(), in.size(), op, root);
  }
}

/// In-place reduce: `data` holds the result on `root` afterwards (and is
/// left as it was elsewhere).
template <element T, reduce_op Op = sum_op>
void reduce(const communicator& comm, std::span<T> data, Op op, int root, coll_options opt = {}) {
  reduce<T, Op>(comm, std::span<const T>(data), data, op, root, opt);
}

/// Allgatherv: rank q contributes counts[q] elements (its `in`) and every
/// rank receives them at out + displs[q]. counts must be the same on every
/// rank (a differing list is a mismatch error); displs are this rank's own
/// layout. `in` may be exactly this rank's block of `out`.
template <element T>
void allgatherv(const communicator& comm, std::span<const std::type_identity_t<T>> in,
                std::span<T> out, std::span<const std::size_t> counts,
                std::span<const std::size_t> displs) {
  detail::check_blocks(comm, "allgatherv", "receive", counts, displs, out.size());
  const auto r = static_cast<std::size_t>(comm.rank());
  if (counts[r] != in.size()) {
    throw usage_error(
        fmt::format("allgatherv on rank {}: input has {} elements but counts[{}] is {}", r,
                    in.size(), r, counts[r]));
  }
  if (in.data() != out.data() + displs[r]) {
    detail::check_disjoint(comm, "allgatherv", in.data(), in.size(), out.data(), out.size());
  }
  const std::size_t total = std::accumulate(counts.begin(), counts.end(), std::size_t{0});
  detail::begin_collective(comm, coll_kind::allgatherv, dtype_of<T>, op_kind::sum, total,
                           detail::counts_hash(counts));
  detail::collective_scope scope(comm);
  detail::note_algorithm(comm, "ring");
  detail::ring_allgatherv(comm.raw(), in.data(), out.data(), counts.data(), displs.data());
}

/// Allgatherv with packed blocks (displacements are the prefix sums of the counts).
template <element T>
void allgatherv(const communicator& comm, std::span<const std::type_identity_t<T>> in,
                std::span<T> out, std::span<const std::size_t> counts) {
  const auto d = detail::packed_displs(counts);
  allgatherv<T>(comm, in, out, counts, d);
}

/// Reduce-scatter with uneven pieces: `in` holds sum(counts) elements on
/// every rank, piece q being counts[q] elements at the prefix sum of the
/// counts before it; rank r receives the reduction of piece r in `out`
/// (counts[r] elements; may be that piece of `in`). counts must be the same
/// on every rank (a differing list is a mismatch error). Runs a ring.
template <element T, reduce_op Op = sum_op>
void reduce_scatter_v(const communicator& comm, std::span<const std::type_identity_t<T>> in,
                      std::span<T> out, std::span<const std::size_t> counts, Op op = {}) {
  const auto p = static_cast<std::size_t>(comm.size());
  const auto r = static_cast<std::size_t>(comm.rank());
  if (counts.size() != p) {
    throw usage_error(
        fmt::format("reduce_scatter_v on rank {}: counts has {} entries, need one "
                    "per rank ({})",
                    r, counts.size(), p));
  }
  const auto offsets = detail::packed_displs(counts);
  const std::size_t total = std::accumulate(counts.begin(), counts.end(), std::size_t{0});
  if (in.size() != total || out.size() != counts[r]) {
    throw usage_error(fmt::format(
        "reduce_scatter_v on rank {}: input has {} elements and output {}, but the counts add up "
        "to {} and counts[{}] is {}",
        r, in.size(), out.size(), total, r, counts[r]));
  }
  if (out.data() != in.data() + offsets[r]) {
    detail::check_disjoint(comm, "reduce_scatter_v", in.data(), in.size(), out.data(), out.size());
  }
  detail::begin_collective(comm, coll_kind::reduce_scatter_v, dtype_of<T>, Op::kind, total,
                           detail::counts_hash(counts));
  detail::collective_scope scope(comm);
  detail::note_algorithm(comm, "ring");
  detail::ring_reduce_scatter_v(comm.raw(), in.data(), out.data(), counts.data(), offsets.data(),
                                op);
}

}  // namespace ringflow

// The common instantiations are compiled once in src/coll/instantiate.cpp.
#define RINGFLOW_RING_EXTERN(T, OP)                                                       \
  extern template void ringflow::detail::ring_allreduce<T, ringflow::OP>(                 \
      ringflow::transport&, const T*, T*, std::size_t, const ringflow::OP&, std::size_t); \
  extern template void ringflow::detail::ring_reduce_scatter<T, ringflow::OP>(            \
      ringflow::transport&, const T*, T*, std::size_t, const ringflow::OP&, std::size_t);
#define RINGFLOW_ALGOS_EXTERN(T, OP)                                                           \
  extern template void ringflow::detail::recursive_doubling_allreduce<T, ringflow::OP>(        \
      ringflow::transport&, const T*, T*, std::size_t, const ringflow::OP&);                   \
  extern template void ringflow::detail::halving_doubling_allreduce<T, ringflow::OP>(          \
      ringflow::transport&, const T*, T*, std::size_t, const ringflow::OP&);                   \
  extern template void ringflow::detail::tree_allreduce<T, ringflow::OP>(                      \
      ringflow::transport&, const T*, T*, std::size_t, const ringflow::OP&, std::size_t, int); \
  extern template void ringflow::detail::hierarchical_allreduce<T, ringflow::OP>(              \
      ringflow::transport&, const T*, T*, std::size_t, const ringflow::OP&,                    \
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

// alltoall, gather, scatter, reduce and the "v" collectives: compiled once in
// src/coll/instantiate_collectives.cpp.
#define RINGFLOW_MOVE_EXTERN(T)                                                                   \
  extern template void ringflow::detail::pairwise_alltoallv<T>(                                   \
      ringflow::transport&, const T*, const std::size_t*, const std::size_t*, T*,                 \
      const std::size_t*, const std::size_t*);                                                    \
  extern template void ringflow::detail::pairwise_alltoall<T>(ringflow::transport&, const T*, T*, \
                                                              std::size_t);                       \
  extern template void ringflow::detail::bruck_alltoall<T>(ringflow::transport&, const T*, T*,    \
                                                           std::size_t);                          \
  extern template void ringflow::detail::linear_gatherv<T>(ringflow::transport&, const T*,        \
                                                           std::size_t, T*, const std::size_t*,   \
                                                           const std::size_t*, int);              \
  extern template void ringflow::detail::linear_scatterv<T>(                                      \
      ringflow::transport&, const T*, const std::size_t*, const std::size_t*, T*, std::size_t,    \
      int);                                                                                       \
  extern template void ringflow::detail::ring_allgatherv<T>(                                      \
      ringflow::transport&, const T*, T*, const std::size_t*, const std::size_t*);
#define RINGFLOW_REDUCE_EXTERN(T, OP)                                                          \
  extern template void ringflow::detail::tree_reduce<T, ringflow::OP>(                         \
      ringflow::transport&, const T*, T*, std::size_t, const ringflow::OP&, int);              \
  extern template void ringflow::detail::ring_reduce<T, ringflow::OP>(                         \
      ringflow::transport&, const T*, T*, std::size_t, const ringflow::OP&, int, std::size_t); \
  extern template void ringflow::detail::ring_reduce_scatter_v<T, ringflow::OP>(               \
      ringflow::transport&, const T*, T*, const std::size_t*, const std::size_t*,              \
      const ringflow::OP&);
#define RINGFLOW_COLL_EXTERN(T)      \
  RINGFLOW_MOVE_EXTERN(T)            \
  RINGFLOW_REDUCE_EXTERN(T, sum_op)  \
  RINGFLOW_REDUCE_EXTERN(T, prod_op) \
  RINGFLOW_REDUCE_EXTERN(T, min_op)  \
  RINGFLOW_REDUCE_EXTERN(T, max_op)  \
  RINGFLOW_REDUCE_EXTERN(T, avg_op)
RINGFLOW_COLL_EXTERN(float)
RINGFLOW_COLL_EXTERN(double)
RINGFLOW_COLL_EXTERN(std::int8_t)
RINGFLOW_COLL_EXTERN(std::uint8_t)
RINGFLOW_COLL_EXTERN(std::int32_t)
RINGFLOW_COLL_EXTERN(std::int64_t)
RINGFLOW_COLL_EXTERN(ringflow::half)
RINGFLOW_COLL_EXTERN(ringflow::bfloat16)
#undef RINGFLOW_COLL_EXTERN
#undef RINGFLOW_MOVE_EXTERN
#undef RINGFLOW_REDUCE_EXTERN
