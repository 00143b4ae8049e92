// ringflow-bench: the table of functions a collective file fills, and the typed helpers they share.
//
// Shape borrowed from nccl-tests: each collective is one small file that
// registers a collective_entry (sizes, bus-bandwidth factor, fill, run,
// baseline, check); bench/harness.cpp owns everything else (flags, buffers,
// warmup, the timing loop, the correctness check, printing). Adding a
// collective or an algorithm is one more file in bench/ that calls
// RINGFLOW_BENCH_REGISTER.
#pragma once

#include <mpi.h>

#include <cstddef>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "ringflow/coll/options.hpp"
#include "ringflow/comm/communicator.hpp"
#include "ringflow/core/dtype.hpp"
#include "ringflow/core/dtype_visit.hpp"
#include "ringflow/core/half.hpp"
#include "ringflow/core/reduce_op.hpp"

namespace ringflow::bench {

/// What every rank runs; identical on all ranks (parsed from the same argv).
struct bench_config {
  dtype type = dtype::f32;
  op_kind op = op_kind::sum;
  std::string algo_name = "ring";  // as given to --algo
  algo algorithm = algo::ring;     // the library algorithm behind algo_name
  std::size_t segment_bytes = 0;   // 0: the library default
  int root = 0;                    // broadcast root
  coll_options options() const { return coll_options{algorithm, segment_bytes}; }
};

/// The buffers of one message size on one rank, in elements of cfg.type.
struct bench_shape {
  std::size_t bytes = 0;       ///< the "size" column: bytes of the whole (unsplit) buffer
  std::size_t count = 0;       ///< the "count" column (per-rank piece for reduce_scatter/allgather)
  std::size_t total = 0;       ///< elements of the whole buffer
  std::size_t send_count = 0;  ///< elements in this rank's send buffer
  std::size_t recv_count = 0;  ///< elements in this rank's receive buffer
};

struct bench_buffers {
  void* send = nullptr;
  void* recv = nullptr;
  bench_shape shape;
};

/// Everything a collective's functions may use.
struct bench_context {
  const communicator& comm;
  MPI_Comm mpi;  // the MPI communicator behind comm (for baselines)
  const bench_config& cfg;
};

/// One row of the table: a collective and the algorithms it accepts.
struct collective_entry {
  std::string_view name;           ///< --coll value
  std::vector<std::string> algos;  ///< --algo values it accepts; the first is the default
  std::string_view baseline;       ///< the MPI call --baseline mpi runs ("" = none)
  bool uses_op = true;             ///< false: -o is ignored (allgather, broadcast)
  /// Buffer sizes for a message of `bytes` bytes; total == 0 means "too small".
  bench_shape (*shape)(std::size_t bytes, std::size_t elem_size, int nranks, int rank) = nullptr;
  /// busbw = algbw * bus_factor(nranks), as in nccl-tests' PERFORMANCE.md.
  double (*bus_factor)(int nranks) = nullptr;
  std::string_view bus_formula;  ///< bus_factor as a formula in n, for the header
  /// Writes this rank's inputs and poisons the outputs (before each check).
  void (*fill)(const bench_context&, const bench_buffers&) = nullptr;
  /// One call of the collective under test.
  void (*run)(const bench_context&, const bench_buffers&) = nullptr;
  /// One call of the MPI baseline on the same buffers (nullptr: none).
  void (*run_baseline)(const bench_context&, const bench_buffers&) = nullptr;
  /// Elements of this rank's output that differ from the exact expected result.
  std::size_t (*count_wrong)(const bench_context&, const bench_buffers&) = nullptr;
};

/// Adds an entry to the table; returns true so it can initialize a static.
bool register_collective(collective_entry entry);
/// Every registered entry.
const std::vector<collective_entry>& collectives();

#define RINGFLOW_BENCH_CONCAT_INNER(a, b) a##b
#define RINGFLOW_BENCH_CONCAT(a, b)       RINGFLOW_BENCH_CONCAT_INNER(a, b)
/// Registers a collective_entry at start-up: RINGFLOW_BENCH_REGISTER(make_entry());
#define RINGFLOW_BENCH_REGISTER(entry)                                                \
  namespace {                                                                         \
  [[maybe_unused]] const bool RINGFLOW_BENCH_CONCAT(rf_bench_registered_, __LINE__) = \
      ::ringflow::bench::register_collective(entry);                                  \
  }

// ---- typed dispatch: ringflow::visit_dtype / visit_op (core/dtype_visit.hpp)

/// The MPI datatype for `t`, or MPI_DATATYPE_NULL (MPI has no half/bfloat16).
MPI_Datatype mpi_datatype(dtype t);
/// The MPI op for `k` (avg maps to MPI_SUM; the caller divides afterwards).
MPI_Op mpi_op(op_kind k);

// ---- deterministic data ---------------------------------------------------

/// Element `i` (index into the whole buffer) of rank `rank`'s input: a small
/// integer, so every reduction of it is exact in every dtype (including half
/// and bfloat16) and does not depend on the order ranks are combined in. It
/// changes with rank and position, so a chunk landing in the wrong place is
/// caught. prod uses mostly 1 with a sparse 2 so products stay small; the
/// others use 0..7 (sums stay exact up to 36 ranks in bfloat16/uint8).
inline int input_int(op_kind op, int rank, std::size_t i) {
  const std::size_t r = static_cast<std::size_t>(rank);
  if (op == op_kind::prod) return (i * 3 + r) % 4 == 0 ? 2 : 1;
  return static_cast<int>((i * 5 + r * 3) % 8);
}

template <class T>
T input_value(op_kind op, int rank, std::size_t i) {
  return static_cast<T>(input_int(op, rank, i));
}

/// The exact reduction over all ranks of element i: folded in rank order,
/// then finished (avg divides once), as ringflow documents it.
template <class T, class Op>
T expected_reduction(const Op& op, int nranks, std::size_t i) {
  T acc = input_value<T>(Op::kind, 0, i);
  for (int r = 1; r < nranks; ++r) acc = op(acc, input_value<T>(Op::kind, r, i));
  return finish(op, acc, nranks);
}

/// Exact equality (NaN is never equal: a poisoned element counts as wrong).
template <class T>
bool same_value(T a, T b) {
  if constexpr (std::is_same_v<T, half> || std::is_same_v<T, bfloat16>) {
    return static_cast<float>(a) == static_cast<float>(b);
  } else {
    return a == b;
  }
}

/// Fills `n` elements with a value no correct result has (all bits set: NaN
/// for the floats, -1 or the maximum for the integers).
void poison(void* data, std::size_t n, std::size_t elem_size);

}  // namespace ringflow::bench
