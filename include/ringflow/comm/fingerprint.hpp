// What a rank is about to run as a collective (kind, sequence number, dtype,
// op, count, root): compared across ranks by the consistency checks. It lives
// in comm/ because transports carry it in collective messages (stamps).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "ringflow/core/dtype.hpp"
#include "ringflow/core/reduce_op.hpp"

namespace ringflow {

enum class coll_kind : std::uint8_t {
  allreduce,
  reduce_scatter,
  allgather,
  broadcast,
  barrier,
  alltoall,
  alltoallv,
  gather,
  gatherv,
  scatter,
  scatterv,
  reduce,
  allgatherv,
  reduce_scatter_v,
};

std::string_view coll_name(coll_kind k);

/// What one rank is about to do; every rank must agree.
struct fingerprint {
  std::uint64_t sequence = 0;
  // Total elements of the collective (same on all ranks); alltoall: per
  // peer; gather/scatter: per rank; 0 for alltoallv, gatherv and scatterv,
  // whose counts no single rank knows (their messages' sizes are checked).
  std::uint64_t count = 0;
  // The root (broadcast, gather(v), scatter(v), reduce), -1 otherwise;
  // allgatherv and reduce_scatter_v: a 31-bit hash of the per-rank counts.
  std::int32_t root = -1;
  coll_kind kind = coll_kind::allreduce;
  dtype type = dtype::f32;
  op_kind op = op_kind::sum;
  std::uint8_t reserved = 0;

  /// "allreduce(type=float, op=sum, count=1000) as collective #7"
  std::string describe() const;
  friend bool operator==(const fingerprint&, const fingerprint&) = default;
};
static_assert(sizeof(fingerprint) == 24);

/// How ranks check that they run the same collective (RINGFLOW_CHECK):
/// - off: not at all (a mismatch may hang until the timeout or give
///   different results on different ranks);
/// - stamp (the default): the first message of each collective between two
///   ranks carries the sender's fingerprint and the receiver compares it
///   with its own; a rank waiting over a second asks its peer what it ran.
///   A mismatch throws usage_error on the rank that sees it and, through the
///   backend (MPI: the job's control channel), on every other rank;
/// - full: before each collective every rank sends its fingerprint to every
///   other (one small all-to-all) and all throw the same usage_error; the
///   communicator stays usable after it. The slowest; meant for debugging.
enum class check_mode : std::uint8_t { off, stamp, full };

std::string_view check_mode_name(check_mode m);

/// RINGFLOW_CHECK: 0/off/false/no -> off; unset, 1/on/true/yes/stamp ->
/// stamp; full -> full. Anything else: a warning and stamp.
check_mode check_mode_from_env();

}  // namespace ringflow
