// ringflow-bench --ring-order: run on a communicator whose ranks are a permutation of
// MPI_COMM_WORLD's.
#pragma once

#include <mpi.h>

#include <string>
#include <vector>

namespace ringflow::bench {

/// Checks the syntax of a --ring-order value: identity, reverse or
/// random:SEED (SEED a non-negative integer). Throws bad_flag.
void check_ring_order(const std::string& spec);

/// order[i] = the world rank that sits at position i of the ring.
std::vector<int> ring_order(const std::string& spec, int nranks);

/// A new communicator (the caller frees it) in which world rank order[i]
/// has rank i, so ring neighbours are order[i-1] and order[i+1]. Collective.
MPI_Comm permuted_comm(MPI_Comm world, const std::string& spec);

/// "reverse: world ranks 3 2 1 0" for the header.
std::string describe_ring_order(const std::string& spec, int nranks);

}  // namespace ringflow::bench
