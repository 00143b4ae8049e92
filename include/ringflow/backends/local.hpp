// The local backend: N ranks as threads in one process, talking through
// shared memory. Used by the tests without mpirun, and by anyone who wants
// collectives between threads of one machine.
#pragma once

#include <functional>
#include <vector>

#include "ringflow/comm/communicator.hpp"

namespace ringflow::local {

/// Runs `fn` on `n` threads, each with its own rank of one in-memory group.
/// If a rank throws, every other rank's pending or next wait fails with a
/// comm_error naming the failed rank (no hang), and run() rethrows the
/// exception of the rank that failed first.
///
/// @code
/// ringflow::local::run(4, [](ringflow::communicator& c) {
///   std::vector<int> v{c.rank()};
///   ringflow::allreduce(c, std::span(v), ringflow::sum);  // v[0] == 6
/// });
/// @endcode
void run(int n, const std::function<void(communicator&)>& fn);

/// The `n` communicators of one fresh in-memory group, for callers that
/// manage their own threads. Each must be used from one thread at a time.
std::vector<communicator> make_group(int n);

}  // namespace ringflow::local
