// Algorithms that a backend provides (today: algo::shm, from backends/shm)
// register here, with their cost function, so coll/ names no backend: not by
// call, not by include, not by string. Part of the extension API
// (docs/extending.md), like coll/extension.hpp.
#pragma once

#include <cstddef>

#include "ringflow/coll/options.hpp"
#include "ringflow/comm/communicator.hpp"
#include "ringflow/core/dtype.hpp"
#include "ringflow/core/reduce_op.hpp"

namespace ringflow {
struct cost_model;
struct cluster_shape;
}  // namespace ringflow

namespace ringflow::ext {

/// A type-erased allreduce: `count` elements of `type` from `in` into `out`
/// (`in == out` for in place), reduced with `op` and, for avg, already divided
/// by the rank count. Returns false, on every rank alike, when it cannot serve
/// this call (e.g. the ranks are not all on one node); it must then not have
/// communicated.
using allreduce_fn = bool (*)(const communicator& comm, void* out, const void* in,
                              std::size_t count, dtype type, op_kind op);

/// The provider's prediction for an allreduce of `bytes` on `shape` under the
/// link model `m` (coll/cost_model.hpp), in seconds; negative when it cannot
/// serve that shape. Without one, algo::automatic never picks the algorithm.
using allreduce_cost_fn = double (*)(const cost_model& m, const cluster_shape& shape,
                                     std::size_t bytes);

/// Makes `a` run `fn`, predicted by `cost`; fn == nullptr unregisters.
/// Thread-safe; the two are replaced together.
///
/// @code
/// // in the MPI backend, when it makes its first communicator:
/// ringflow::ext::register_algorithm(ringflow::algo::shm, &shm::try_allreduce, &shm_cost);
/// @endcode
void register_algorithm(algo a, allreduce_fn fn, allreduce_cost_fn cost = nullptr);

/// The function registered for `a`, or nullptr.
allreduce_fn registered_algorithm(algo a) noexcept;

/// The cost function registered for `a`, or nullptr.
allreduce_cost_fn registered_cost(algo a) noexcept;

}  // namespace ringflow::ext
