// ringflow::explain: what algo::automatic does for an allreduce on a given
// communicator, and why (the cost model's candidates, a tuning table's rows,
// or first-use tuning's measured medians). The explanation type and the pure
// choice functions it builds on are in coll/cost_model.hpp.
#pragma once

#include <cstddef>

#include "ringflow/coll/cost_model.hpp"
#include "ringflow/comm/communicator.hpp"
#include "ringflow/core/dtype.hpp"

namespace ringflow {

/// What algo::automatic does for an allreduce of `bytes` on `comm`: the model
/// of rank 0 (sent to the others once per communicator) and the node layout.
/// Collective: every rank calls it, in the same order relative to the other
/// collectives (the first call on a communicator may exchange the model);
/// `type` is accepted for the future, the model treats all dtypes alike.
///
/// @code
/// fmt::print("{}\n", ringflow::explain(comm, 4 << 20, ringflow::dtype::f32).to_string());
/// @endcode
explanation explain(const communicator& comm, std::size_t bytes, dtype type = dtype::f32);

}  // namespace ringflow
