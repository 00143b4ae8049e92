// Algorithms that live outside coll/ (the shared-memory path of
// backends/shm) register an allreduce here, so coll/ needs no backend header.
#pragma once

#include <cstddef>

#include "ringflow/coll/options.hpp"
#include "ringflow/comm/communicator.hpp"
#include "ringflow/core/dtype.hpp"
#include "ringflow/core/reduce_op.hpp"

namespace ringflow::detail {

/// A type-erased allreduce: `count` elements of `type` from `in` into `out`
/// (`in == out` for in place), reduced with `op` and, for avg, already divided
/// by the rank count. Returns false, on every rank alike, when it cannot serve
/// this call (e.g. the ranks are not all on one node); it must then not have
/// communicated.
using allreduce_fn = bool (*)(const communicator& comm, void* out, const void* in,
                              std::size_t count, dtype type, op_kind op);

/// Makes `a` (today: algo::shm) run `fn`; nullptr unregisters. Thread-safe.
///
/// @code
/// // in the shm backend, once at start-up:
/// ringflow::detail::register_algorithm(ringflow::algo::shm, &ringflow::shm::try_allreduce);
/// @endcode
void register_algorithm(algo a, allreduce_fn fn);

/// The function registered for `a`, or nullptr.
allreduce_fn registered_algorithm(algo a) noexcept;

}  // namespace ringflow::detail
