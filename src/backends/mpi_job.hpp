// The MPI job as this rank sees it (internal to the MPI and shm backends):
// a control channel over which ranks announce that they failed or left, the
// "job is broken" state, and the watchdog thread that ends a broken job.
//
// Why: a collective that fails on one rank (timeout, mismatch, a dead peer)
// leaves the other ranks waiting for messages that will never come, and
// MPI_Finalize then waits for them too. So the first rank that sees a
// failure tells every other rank (they throw at their next wait instead of
// waiting out the timeout), and a broken job is ended with MPI_Abort when the
// environment is destroyed, or by the watchdog a few seconds after the
// failure if the program carries on. A rank that finishes normally says so
// (a "left" notice), so a rank still waiting for it learns that at once.
#pragma once

#include <mpi.h>

#include <chrono>
#include <string>
#include <string_view>
#include <vector>

namespace ringflow::mpi::job {

/// What a notice on the control channel says.
enum class notice : int { left = 1, failed = 2, mismatch = 3 };

/// How long a broken job's process may live on after the failure before the
/// watchdog ends the job (enough to log and write a local file).
inline constexpr std::chrono::seconds abort_grace{5};
/// How long a wait on a rank that has left may go on (its last messages may
/// still be in flight) before it is declared hopeless.
inline constexpr std::chrono::milliseconds left_grace{1000};

/// Called by mpi::environment once MPI is initialized (collective over
/// MPI_COMM_WORLD): creates the control channel and starts the watchdog.
void start();
/// Called by mpi::environment before MPI_Finalize: a broken job is aborted
/// here (never returns); otherwise this rank announces it is leaving and the
/// watchdog stops.
void finish() noexcept;

/// The first failure of a collective on this rank: marks the job broken,
/// tells every other rank (once) and lets the watchdog end the job unless
/// mpi::set_abort_on_failure(false). Never throws.
void fail(notice kind, std::string_view text) noexcept;

/// True once the job is broken (this rank failed or heard that another did).
bool broken() noexcept;

/// Polls the control channel and throws the error a waiting rank should
/// throw when the job is broken (this rank or another failed; a mismatch
/// notice becomes usage_error, any other comm_error), or when `world_peer`,
/// the rank being waited on, left the job more than left_grace ago. `self`
/// is this rank in the communicator, `what` says what it waits for. Cheap
/// when nothing happened; a no-op without a control channel.
void check_peer(int world_peer, int self, std::string_view what);
/// As check_peer, for a wait on every member of a communicator (world ranks).
void check_members(const std::vector<int>& members, int self, std::string_view what);

/// The world ranks of the members of `comm`, in its rank order.
std::vector<int> world_ranks(MPI_Comm comm);

}  // namespace ringflow::mpi::job
