// Checked mode: ranks compare what collective they are about to run.
#pragma once

#include <cstdint>
#include <string>

#include "ringflow/comm/communicator.hpp"
#include "ringflow/comm/fingerprint.hpp"
#include "ringflow/core/dtype.hpp"
#include "ringflow/core/reduce_op.hpp"

namespace ringflow {

namespace detail {
/// Exchanges fingerprints among all ranks of `comm`; if any differ, throws
/// usage_error on every rank, naming which ranks called what.
void verify_fingerprint(const communicator& comm, const fingerprint& mine);

/// Drops the cached per-communicator context (coll/context.hpp).
void forget_context(const communicator& comm) noexcept;

/// Takes the next sequence number (returned) and checks, as the
/// communicator's check_mode says, that every rank runs the same collective:
/// stamp mode hands the fingerprint to the transport, which carries it in the
/// collective's messages; full mode exchanges it now. Collective #0 of a
/// communicator also drops any context cached under its transport's address
/// (a previous communicator may have lived there). Code that runs a
/// collective of its own should call this too.
inline std::uint64_t begin_collective(const communicator& comm, coll_kind kind, dtype type,
                                      op_kind op, std::size_t count, int root = -1) {
  const std::uint64_t seq = comm.next_sequence();
  if (seq == 0) forget_context(comm);
  const check_mode mode = comm.check_mode();
  if (mode == check_mode::off) {
    comm.raw().end_stamps();
    return seq;
  }
  fingerprint fp;
  fp.sequence = seq;
  fp.count = count;
  fp.root = root;
  fp.kind = kind;
  fp.type = type;
  fp.op = op;
  if (mode == check_mode::stamp) {
    comm.raw().begin_stamps(fp);
  } else {
    comm.raw().end_stamps();
    verify_fingerprint(comm, fp);
  }
  return seq;
}
}  // namespace detail

}  // namespace ringflow
