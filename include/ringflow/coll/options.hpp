// Algorithm choice and tuning knobs shared by the collectives.
#pragma once

#include <cstddef>
#include <string_view>

namespace ringflow {

/// Which algorithm a collective uses.
enum class algo {
  automatic,  ///< ringflow picks (today: ring; see docs/architecture.md)
  ring,       ///< pipelined ring reduce-scatter + allgather
  native,     ///< the backend's own collective (MPI_Allreduce); allreduce only
};

constexpr std::string_view algo_name(algo a) {
  switch (a) {
    case algo::automatic: return "auto";
    case algo::ring: return "ring";
    case algo::native: return "native";
  }
  return "unknown";
}

/// Parses "auto", "ring", "native"; throws usage_error otherwise.
algo parse_algo(std::string_view text);

/// Default ring segment: large enough that per-message overhead is small,
/// small enough that reducing one segment overlaps receiving the next.
inline constexpr std::size_t default_segment_bytes = 256 * 1024;

struct coll_options {
  algo algorithm = algo::automatic;
  /// Bytes per pipelined ring segment; 0 means default_segment_bytes.
  std::size_t segment_bytes = 0;
};

}  // namespace ringflow
