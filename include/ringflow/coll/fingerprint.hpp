// Checked mode: ranks compare what collective they are about to run.
#pragma once

#include <cstdint>
#include <string>

#include "ringflow/comm/communicator.hpp"
#include "ringflow/core/dtype.hpp"
#include "ringflow/core/reduce_op.hpp"

namespace ringflow {

enum class coll_kind : std::uint8_t { allreduce, reduce_scatter, allgather, broadcast, barrier };

std::string_view coll_name(coll_kind k);

/// What one rank is about to do; every rank must agree.
struct fingerprint {
  std::uint64_t sequence = 0;
  std::uint64_t count = 0;  // total elements of the collective (same on all ranks)
  std::int32_t root = -1;   // broadcast root, -1 otherwise
  coll_kind kind = coll_kind::allreduce;
  dtype type = dtype::f32;
  op_kind op = op_kind::sum;
  std::uint8_t reserved = 0;

  std::string describe() const;
  friend bool operator==(const fingerprint&, const fingerprint&) = default;
};

namespace detail {
/// Exchanges fingerprints among all ranks of `comm`; if any differ, throws
/// usage_error on every rank, naming which ranks called what.
void verify_fingerprint(const communicator& comm, const fingerprint& mine);

/// Drops the cached per-communicator context (coll/context.hpp).
void forget_context(const communicator& comm) noexcept;

/// Takes the next sequence number (returned) and, in checked mode, verifies.
/// Collective #0 of a communicator also drops any context cached under its
/// transport's address (a previous communicator may have lived there).
/// Code that runs a collective of its own should call this too.
inline std::uint64_t begin_collective(const communicator& comm, coll_kind kind, dtype type,
                                      op_kind op, std::size_t count, int root = -1) {
  const std::uint64_t seq = comm.next_sequence();
  if (seq == 0) forget_context(comm);
  if (comm.checked()) {
    fingerprint fp;
    fp.sequence = seq;
    fp.count = count;
    fp.root = root;
    fp.kind = kind;
    fp.type = type;
    fp.op = op;
    verify_fingerprint(comm, fp);
  }
  return seq;
}
}  // namespace detail

}  // namespace ringflow
