// Algorithm choice and tuning knobs shared by the collectives.
#pragma once

#include <cstddef>
#include <string_view>

namespace ringflow {

/// Which algorithm a collective uses. Only allreduce offers all of them;
/// reduce_scatter and allgather run the ring (automatic means ring there) or
/// recursive halving / doubling (halving_doubling; allgather also
/// recursive_doubling) on power-of-two rank counts.
/// See docs/collectives.md for when each one wins.
enum class algo {
  automatic,           ///< ringflow picks with its cost model (see ringflow::explain)
  ring,                ///< pipelined ring reduce-scatter + allgather
  native,              ///< the backend's own collective (MPI_Allreduce); allreduce only
  recursive_doubling,  ///< log2(p) full-buffer exchanges: few messages, for small buffers
  halving_doubling,    ///< Rabenseifner: recursive-halving reduce-scatter + doubling allgather
  tree,                ///< pipelined binary-tree reduce + broadcast
  double_tree,         ///< two complementary binary trees, each carrying half the buffer
  hierarchical,        ///< intra-node reduce-scatter, inter-node ring, intra-node allgather
  shm,                 ///< intra-node shared memory (registered by the shm backend)
};

/// How many values `algo` has (coll/algorithms.hpp holds a row for each).
inline constexpr std::size_t algo_count = 9;

/// The algorithm's name ("auto", "ring", "recursive_doubling", ...), from the
/// algorithm table (coll/algorithms.hpp); "unknown" outside the enum. A
/// string literal: it stays valid for the whole program.
std::string_view algo_name(algo a) noexcept;

/// Parses an algo_name() ("auto", "ring", "recursive_doubling", ...) or an
/// alias from the table ("automatic", "rd", "hd", "rabenseifner", "dtree");
/// throws usage_error listing the names otherwise.
algo parse_algo(std::string_view text);

/// Default ring segment: large enough that per-message overhead is small,
/// small enough that reducing one segment overlaps receiving the next.
inline constexpr std::size_t default_segment_bytes = 256 * 1024;

/// Default tree segment: smaller than the ring's, because a tree pays its
/// depth in segments before the pipeline is full.
inline constexpr std::size_t default_tree_segment_bytes = 64 * 1024;

struct coll_options {
  algo algorithm = algo::automatic;
  /// Bytes per pipelined segment (ring, tree, double_tree, and the
  /// inter-node ring of hierarchical); 0 means the algorithm's default.
  std::size_t segment_bytes = 0;
};

/// Which algorithm alltoall uses (alltoallv always runs the pairwise exchange).
enum class alltoall_algo {
  automatic,  ///< the cost model picks (rank 0's model, the same on every rank)
  pairwise,   ///< p-1 direct messages per rank, several in flight: for large blocks
  bruck,      ///< ceil(log2 p) rounds of packed blocks: few messages, for small blocks
};

constexpr std::string_view alltoall_algo_name(alltoall_algo a) {
  switch (a) {
    case alltoall_algo::automatic: return "auto";
    case alltoall_algo::pairwise: return "pairwise";
    case alltoall_algo::bruck: return "bruck";
  }
  return "unknown";
}

struct alltoall_options {
  alltoall_algo algorithm = alltoall_algo::automatic;
};

}  // namespace ringflow
