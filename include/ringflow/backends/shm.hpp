// Intra-node shared-memory allreduce: the ranks of one node stage their
// inputs in one POSIX shared segment and each reduces its slice of every
// block straight from the others' staging areas (see docs/shm.md).
#pragma once

#include <fmt/format.h>

#include <cstddef>
#include <functional>
#include <span>
#include <type_traits>

#include "ringflow/comm/communicator.hpp"
#include "ringflow/core/dtype.hpp"
#include "ringflow/core/error.hpp"
#include "ringflow/core/reduce_op.hpp"

namespace ringflow {

namespace detail {
/// The shm allreduce without argument checks or checked-mode fingerprints:
/// what coll/ dispatches to once it has done both. `in` may equal `out`.
/// Throws not_supported_error when `comm` is not an MPI communicator whose
/// ranks all share one node, timeout_error when a rank does not arrive
/// within comm.raw().timeout(), usage_error when the ranks disagree on
/// count, type or op.
void shm_allreduce(const communicator& comm, const void* in, void* out, std::size_t count,
                   dtype type, op_kind op);

/// Registers shm::try_allreduce and its cost function as algo::shm with
/// coll/ (idempotent; true). The MPI backend calls it when it makes a
/// communicator (the one way it is registered), which also keeps this object
/// file in a static libringflow.
bool shm_register() noexcept;
}  // namespace detail

namespace shm {

/// Collective (every rank must call it): true when the shm path can run on
/// `comm`, i.e. it uses the mpi backend and all of its ranks share one node
/// (MPI_Comm_split_type SHARED). The answer is cached on the communicator.
bool usable(const communicator& comm);

/// The hook coll/ calls for algo::shm (after its own argument checks and
/// fingerprint): runs the shm allreduce and returns true, or returns false on
/// every rank alike, before touching any data, when `comm` is not an MPI
/// communicator whose ranks share one node. Errors inside the call throw as
/// in allreduce() below.
bool try_allreduce(const communicator& comm, void* out, const void* in, std::size_t count,
                   dtype type, op_kind op);

/// The largest block in bytes that one pipeline step moves per rank (rank 0's
/// RINGFLOW_SHM_BLOCK, else default_block_bytes): the segment holds
/// 2 (ranks + 1) blocks. A call of B bytes is cut into blocks of
/// max(64 KiB, B / 2) bytes, at most this many.
std::size_t block_bytes(const communicator& comm);

/// Default largest block per rank. Each block costs every rank two waits;
/// on a loaded or oversubscribed node a wait can cost a scheduler slice, so
/// fewer, larger blocks beat cache-sized ones there (see docs/shm.md).
inline constexpr std::size_t default_block_bytes = 4 * 1024 * 1024;

/// Allreduce through node shared memory. Results are bitwise identical on
/// every rank and from run to run: element i is always combined in rank
/// order 0, 1, ..., p-1 (and avg divides once at the end). The first call on
/// a communicator creates its segment (collective); later calls reuse it.
/// Communicators that span several nodes get not_supported_error: compose
/// with an inter-node algorithm (coll's hierarchical allreduce) instead.
///
/// @code
/// auto world = ringflow::mpi::world();
/// std::vector<float> g(1 << 20, 1.0f);
/// ringflow::shm::allreduce(world, std::span(g), ringflow::sum);  // g[i] == world.size()
/// @endcode
template <element T, reduce_op Op = sum_op>
void allreduce(const communicator& comm, std::span<const std::type_identity_t<T>> in,
               std::span<T> out, Op op = {}) {
  (void)op;  // stateless: the kind selects the functor inside
  if (in.size() != out.size()) {
    throw usage_error(fmt::format("shm::allreduce on rank {}: input has {} elements, output {}",
                                  comm.rank(), in.size(), out.size()));
  }
  const auto* a = reinterpret_cast<const std::byte*>(in.data());
  const auto* b = reinterpret_cast<const std::byte*>(out.data());
  const std::size_t n = in.size_bytes();
  const std::less<const std::byte*> lt;
  if (a != b && n > 0 && lt(a, b + n) && lt(b, a + n)) {
    throw usage_error(fmt::format(
        "shm::allreduce on rank {}: input and output overlap without being the same buffer",
        comm.rank()));
  }
  // No comm.next_sequence(): coll/ does per-communicator work at collective
  // #0 (begin_collective), so only coll/ may take sequence numbers.
  detail::shm_allreduce(comm, in.data(), out.data(), in.size(), dtype_of<T>, Op::kind);
}

/// In-place shm allreduce.
template <element T, reduce_op Op = sum_op>
void allreduce(const communicator& comm, std::span<T> data, Op op = {}) {
  shm::allreduce<T, Op>(comm, std::span<const T>(data), data, op);
}

}  // namespace shm
}  // namespace ringflow
