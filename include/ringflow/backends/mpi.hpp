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
/// other ranks stop instead of hanging.
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

}  // namespace ringflow::mpi
