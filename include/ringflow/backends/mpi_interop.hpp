// Interop with code that has its own MPI communicators. Includes <mpi.h>.
#pragma once

#include <mpi.h>

#include "ringflow/comm/communicator.hpp"

namespace ringflow::mpi {

/// A communicator over a duplicate of `comm` (the caller keeps ownership of
/// `comm`; ringflow frees its duplicate when the last handle goes).
communicator from_comm(MPI_Comm comm);

/// The duplicated MPI communicator behind a ringflow communicator of the MPI
/// backend; throws usage_error for other backends.
MPI_Comm native_handle(const communicator& comm);

}  // namespace ringflow::mpi
