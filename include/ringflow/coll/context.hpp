// Per-communicator facts the algorithms need, established once by a
// collective exchange and kept in the communicator's slot: the node layout, rank 0's cost model and
// rank 0's tuning table for this rank count and layout.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "ringflow/coll/cost_model.hpp"
#include "ringflow/coll/first_use.hpp"
#include "ringflow/coll/options.hpp"
#include "ringflow/coll/topology.hpp"
#include "ringflow/coll/tuning.hpp"
#include "ringflow/comm/communicator.hpp"

namespace ringflow::detail {

struct comm_context {
  topology topo;
  cost_model model;  // rank 0's, identical on every rank
  cluster_shape shape;
  /// Rank 0's measured table for exactly this shape (identical on every
  /// rank), or none; where it came from, or why there is none.
  std::shared_ptr<const tuning_table> table;
  std::string table_origin;
  std::string table_note;
  /// Set (on every rank alike) when the registered shm allreduce declined a
  /// call that automatic gave it: automatic stops offering shm here.
  mutable std::atomic<bool> shm_declined{false};
  /// First-use tuning (rank 0's RINGFLOW_AUTOTUNE) and its state: sizes no
  /// table covers are measured on their first allreduces.
  bool first_use = true;
  mutable first_use_tuner tuner;

  /// Whether first-use tuning decides allreduces of `bytes` here (it is on
  /// and no table covers the size).
  bool first_use_decides(std::size_t bytes) const;

  /// The shape automatic chooses for (without shm once it declined).
  cluster_shape choice_shape() const {
    cluster_shape s = shape;
    s.shm = s.shm && !shm_declined.load(std::memory_order_relaxed);
    return s;
  }
};

/// The context of `comm` (never null; it lives as long as comm). The first
/// call on a communicator is itself collective (one small allgather, and
/// shm's set-up when first-use tuning may try shm); later calls are one
/// atomic load (communicator::slot).
const comm_context* context_of(const communicator& comm);

/// The algorithm algo::automatic runs for an allreduce of `bytes` (p > 1):
/// rank 0's tuning table where it covers the size, else first-use tuning
/// (a trial while the size class is being measured, then the measured
/// fastest), else (RINGFLOW_AUTOTUNE=off) rank 0's cost model. When
/// `timed`, the caller times the call and passes the seconds to
/// automatic_trial_done.
struct automatic_pick {
  algo algorithm = algo::ring;
  bool timed = false;
  first_use_tuner::pick trial;
  const comm_context* context = nullptr;
};
automatic_pick automatic_allreduce_pick(const communicator& comm, std::size_t bytes);
void automatic_trial_done(const automatic_pick& p, double seconds);

/// Allreduces of `bytes` still to come on `comm` before first-use tuning has
/// settled that size (0: settled, or no tuning applies there; -1: the
/// communicator has no context yet or the size class was not seen). Local,
/// and the same on every rank; benchmarks use it to run auto's trials
/// before they time it.
int automatic_calls_left(const communicator& comm, std::size_t bytes);

/// After the shm allreduce declined a call automatic gave it (it does so on
/// every rank alike): remembers that for this communicator and returns the
/// choice without shm.
algo automatic_after_shm_declined(const communicator& comm, std::size_t bytes);

}  // namespace ringflow::detail
