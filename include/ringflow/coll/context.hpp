// Per-communicator facts the algorithms need, established once by a
// collective exchange and cached: the node layout and rank 0's cost model.
#pragma once

#include <cstddef>
#include <cstdint>
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

/// The context of `comm`, for the collective with sequence number `seq`.
/// The first call on a communicator is itself collective (one small
/// allgather); later calls are a lookup. The cache is keyed by transport
/// address, so it must notice a new communicator at an old address on every
/// rank alike: it is dropped at collective #0 (forget_context), and an entry
/// last used at a sequence number >= `seq` is stale (sequence numbers only
/// grow on one communicator), which also covers code that takes sequence
/// numbers without begin_collective.
std::shared_ptr<const comm_context> context_of(const communicator& comm, std::uint64_t seq);

/// Drops the cached context of comm's transport (called at collective #0).
void forget_context(const communicator& comm) noexcept;

/// The algorithm algo::automatic runs for an allreduce of `bytes` (p > 1).
algo automatic_allreduce_algo(const communicator& comm, std::size_t bytes, std::uint64_t seq);

}  // namespace ringflow::detail
