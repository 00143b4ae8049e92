// ringflow-bench peer: Gloo's ring, ring-chunked and halving-doubling allreduce over TCP on
// loopback.
#pragma once

#include <mpi.h>

#include <memory>
#include <string>
#include <vector>

#include "harness.hpp"

namespace ringflow::bench {

/// Gloo's allreduces as extra contenders of --algo all. Built only when CMake
/// found Gloo (RINGFLOW_BENCH_HAS_GLOO); otherwise, and for anything but
/// float sum, names() is empty and skip_reason() says why.
///
/// Gloo allreduces in place on buffers fixed at construction, so prepare()
/// builds the three algorithms on the receive buffer for each size (setup,
/// not timed) and run() copies send into receive and then allreduces it: the
/// copy is what an out-of-place call costs, as it is for MPI and ringflow.
class gloo_peer {
 public:
  /// Collective over `mpi`: every rank connects a Gloo context (TCP on
  /// 127.0.0.1, rendezvous through a FileStore in a temporary directory that
  /// rank 0 creates and removes). Throws ringflow::comm_error on failure.
  gloo_peer(MPI_Comm mpi, dtype type, op_kind op);
  ~gloo_peer();
  gloo_peer(const gloo_peer&) = delete;
  gloo_peer& operator=(const gloo_peer&) = delete;

  /// The contender names: gloo_ring, gloo_ring_chunked, gloo_halv_dbl (or none).
  const std::vector<std::string>& names() const { return names_; }
  /// Why Gloo is not in the run ("" when it is).
  const std::string& skip_reason() const { return skip_reason_; }
  /// True when `name` is one of names().
  bool runs(const std::string& name) const;
  /// Builds the algorithms for this size on b.recv (same order on every rank).
  void prepare(const bench_buffers& b);
  /// One call of Gloo's algorithm `name` on b (prepare()d for this size).
  void run(const std::string& name, const bench_buffers& b);

 private:
  struct state;
  std::unique_ptr<state> state_;
  std::vector<std::string> names_;
  std::string skip_reason_;
};

}  // namespace ringflow::bench
