// The allreduce table row (sizes, bus factor, fill, MPI_Allreduce baseline,
// wrong count) that every allreduce registration shares; only algos and run differ.
#pragma once

#include <string>
#include <vector>

#include "harness.hpp"

namespace ringflow::bench {

/// An allreduce entry accepting `algos` (the first is the default) and
/// running ringflow::allreduce with the configured algorithm.
collective_entry allreduce_entry(std::vector<std::string> algos);

}  // namespace ringflow::bench
