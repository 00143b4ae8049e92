// How a waiting rank of the MPI and shm backends uses its core: one decision
// per process, from the node's ranks and cores, shared by both backends (they
// used to probe separately and disagree under taskset).
//
// Spinning is fastest when every busy thread has a core. A waiting caller
// competes with the other ranks only: it yields when the node has more ranks
// than cores. While a progress thread (coll/async) is alive, each rank has
// two busy threads, so every wait yields when two threads per rank are more
// than the cores. RINGFLOW_YIELD=0/1 overrides both.
#pragma once

#include <mpi.h>

#include <atomic>

#include "ringflow/comm/transport.hpp"

namespace ringflow::mpi::waiting {

struct occupancy {
  int local_ranks = 1;  // ranks of this job on this node
  int cores = 1;        // CPUs the node's ranks may run on, together
};

/// Decides once per process (collective over `comm`'s node the first time:
/// MPI_Comm_split_type and an allgather of CPU masks); later calls return the
/// first answer.
occupancy probe(MPI_Comm comm);

/// The decision for callers and for progress threads (after probe).
bool yield_caller() noexcept;
bool yield_progress() noexcept;

/// Whether the calling thread should yield while it waits: by the progress
/// rule on a progress thread, and on any thread while one is alive (it
/// shares the rank's cores); by the caller rule otherwise.
inline bool should_yield() noexcept {
  return detail::on_progress_thread() || detail::progress_threads() > 0 ? yield_progress()
                                                                        : yield_caller();
}

}  // namespace ringflow::mpi::waiting
