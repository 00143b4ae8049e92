// Per-communicator facts the algorithms need, established once by a
// collective exchange and cached: the node layout and rank 0's cost model.
#pragma once

#include <cstddef>
#include <memory>

#include "ringflow/coll/cost_model.hpp"
#include "ringflow/coll/options.hpp"
#include "ringflow/coll/topology.hpp"
#include "ringflow/comm/communicator.hpp"

namespace ringflow::detail {

struct comm_context {
  topology topo;
  cost_model model;  // rank 0's, identical on every rank
  cluster_shape shape;
};

/// The context of `comm`. The first call after the communicator's first
/// collective is itself collective (one small allgather); later calls are a
/// lookup. The cache is keyed by transport and dropped at every
/// communicator's collective #0 (forget_context), which all ranks reach at
/// the same point, so all ranks agree on when the exchange happens.
std::shared_ptr<const comm_context> context_of(const communicator& comm);

/// Drops the cached context of comm's transport (called at collective #0).
void forget_context(const communicator& comm) noexcept;

/// The algorithm algo::automatic runs for an allreduce of `bytes` (p > 1).
algo automatic_allreduce_algo(const communicator& comm, std::size_t bytes);

}  // namespace ringflow::detail
