// The MPI backend: a communicator over MPI point-to-point on a duplicated
// communicator, with every MPI error turned into a comm_error. This header
// does not include <mpi.h>; see mpi_interop.hpp to wrap your own MPI_Comm.
#pragma once

#include "ringflow/comm/communicator.hpp"

namespace ringflow::mpi {

/// Thread support to ask MPI for (MPI_THREAD_*).
enum class threading { single, funneled, serialized, multiple };

/// RAII MPI_Init_thread / MPI_Finalize. If MPI is already initialized it does
/// nothing (and does not finalize). While it lives, an exception that escapes
/// main on any rank aborts the whole job (MPI_Abort) after printing it, so the
/// other ranks stop instead of hanging; a rank whose environment is destroyed
/// tells the others it has left (a rank still waiting for it fails within a
/// second instead of at its timeout), and a job whose collectives failed is
/// ended with MPI_Abort instead of MPI_Finalize (see set_abort_on_failure).
class environment {
 public:
  /// Asks for MPI_THREAD_MULTIPLE by default: the nonblocking collectives
  /// run on a progress thread while the caller keeps using MPI.
  environment(int& argc, char**& argv, threading level = threading::multiple);
  environment();
  ~environment();
  environment(const environment&) = delete;
  environment& operator=(const environment&) = delete;

  /// The thread level MPI granted.
  threading provided() const noexcept { return provided_; }

 private:
  void init(int* argc, char*** argv, threading level);
  bool owns_ = false;
  threading provided_ = threading::single;
};

/// A communicator over a duplicate of MPI_COMM_WORLD (so ringflow's messages
/// never mix with the application's). Requires an initialized MPI.
communicator world();

/// True when MPI has been initialized and not finalized.
bool initialized() noexcept;

/// Ends the whole MPI job with `code` after logging `why` (MPI_Abort).
[[noreturn]] void abort(int code, std::string_view why) noexcept;

/// What happens when a collective fails on the MPI backend (a timeout, a
/// mismatch between ranks, a rank that failed or left): the error is thrown
/// on this rank, every other rank is told (it throws at its next wait
/// instead of waiting out RINGFLOW_TIMEOUT), and the job is then broken:
/// with abort_on_failure() (the default) ringflow ends it with MPI_Abort
/// when the environment is destroyed, or 5 s after the failure if the
/// program keeps running, so mpirun never waits forever. set(false) only
/// throws, as before (for tests that provoke failures on purpose); the
/// communicator is unusable after such a failure either way.
void set_abort_on_failure(bool on) noexcept;
bool abort_on_failure() noexcept;

}  // namespace ringflow::mpi
