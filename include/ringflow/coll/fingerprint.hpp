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

/// Takes the next sequence number (returned) and checks, as the
/// communicator's check_mode says, that every rank runs the same collective:
/// stamp mode hands the fingerprint to the transport, which carries it in the
/// collective's messages; full mode exchanges it now. Code that runs a
/// collective of its own should call this too.
inline std::uint64_t begin_collective(const communicator& comm, coll_kind kind, dtype type,
                                      op_kind op, std::size_t count, int root = -1) {
  const std::uint64_t seq = comm.next_sequence();
  if (flight_record* prev = comm.raw().flight_current()) {
    // The previous collective began without a collective_scope (the NCCL
    // path, which only enqueues): it returned, so it is done.
    flight_ring::end(prev, true);
    comm.raw().set_flight_current(nullptr);
  }
  if (flight_ring* ring = comm.raw().flight_ring()) {
    comm.raw().set_flight_current(ring->begin(seq, kind, type, op, count, root));
  }
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
    try {
      verify_fingerprint(comm, fp);
    } catch (...) {
      if (flight_record* r = comm.raw().flight_current()) {
        flight_ring::end(r, false);
        comm.raw().set_flight_current(nullptr);
      }
      throw;
    }
  }
  return seq;
}

/// Ends the flight record of the collective begun on `comm` (state done, or
/// failed when the scope is left by an exception). Every public collective
/// holds one from begin_collective to its end.
class collective_scope {
 public:
  explicit collective_scope(const communicator& comm) noexcept
      : t_(comm.raw()), rec_(t_.flight_current()), exceptions_(std::uncaught_exceptions()) {}
  collective_scope(const collective_scope&) = delete;
  collective_scope& operator=(const collective_scope&) = delete;
  ~collective_scope() {
    if (rec_ == nullptr) return;
    flight_ring::end(rec_, std::uncaught_exceptions() == exceptions_);
    if (t_.flight_current() == rec_) t_.set_flight_current(nullptr);
  }

 private:
  transport& t_;
  flight_record* rec_;
  int exceptions_;
};

/// Notes the algorithm a collective runs (a string literal: algo_name()).
inline void note_algorithm(const communicator& comm, std::string_view name) noexcept {
  if (flight_record* r = comm.raw().flight_current()) {
    r->algorithm.store(name.data(), std::memory_order_relaxed);
  }
}
}  // namespace detail

}  // namespace ringflow
