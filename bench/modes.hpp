// ringflow-bench modes beyond timing one algorithm: --algo all (every
// allreduce algorithm interleaved at each size), --tune (the same, saved as
// a tuning table for algo::automatic) and --calibrate (measure the cost
// model's alpha, beta, gamma and save them).
#pragma once

#include <mpi.h>

#include "cli.hpp"
#include "harness.hpp"

namespace ringflow::bench {

/// --algo all: every allreduce algorithm, auto and MPI_Allreduce at each
/// size, interleaved rep by rep; prints a table (or --csv/--json). Returns
/// the exit status.
int run_algo_sweep(const communicator& comm, MPI_Comm mpi, const bench_cli& cli,
                   const collective_entry& entry);

/// --tune: the --algo all loop over the algorithms automatic may pick (shm
/// included when usable), adaptive iterations, results checked; rank 0
/// merges the medians into the tuning file (ringflow::tuning_path()) as the
/// table for this rank count and node layout. Returns the exit status.
int run_tuning(const communicator& comm, MPI_Comm mpi, const bench_cli& cli,
               const collective_entry& entry);

/// --calibrate: ping-pong and a timed reduction; rank 0 saves the model to
/// ringflow::cost_model_path(). Returns the exit status.
int run_calibration(const communicator& comm, MPI_Comm mpi, const bench_cli& cli);

}  // namespace ringflow::bench
