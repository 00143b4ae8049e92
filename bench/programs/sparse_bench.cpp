// sparse_bench: sparse_allreduce of an embedding table's touched rows against
// the dense allreduce of the whole table, interleaved, over MPI ranks.
//
//   mpirun -np 2 build/bin/sparse_bench                          # 100000 x 16, 1% rows per rank
//   mpirun -np 4 build/bin/sparse_bench --density 0.01 --reps 31
//   mpirun -np 4 build/bin/sparse_bench --density 0.5 --reduction auto   # dense fallback
//
// Each repetition runs both (alternating which goes first) after a barrier;
// a run's time is the slowest rank's. Rank 0 prints the medians, their ratio
// (dense / sparse) and the bytes each sends from rank 0. Every rank touches
// its own random density * rows distinct rows (seeded per rank), so at p
// ranks the reduced result holds up to p * density * rows rows. --reduction
// auto or dense passes the table's row count (sparse_allreduce_options), so
// sparse_allreduce may (auto) or must (dense) reduce the table densely;
// sparse (the default) never does.
#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "tool_flags.hpp"
#include <ringflow/backends/mpi.hpp>
#include <ringflow/coll/collectives.hpp>
#include <ringflow/coll/sparse.hpp>
#include <ringflow/train/data_parallel.hpp>

namespace {
double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Seconds `fn` took on the slowest rank.
template <class Fn>
double timed(const ringflow::communicator& comm, Fn&& fn) {
  ringflow::barrier(comm);
  const auto t0 = std::chrono::steady_clock::now();
  fn();
  double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  ringflow::allreduce(comm, std::span<double>(&s, 1), ringflow::max);
  return s;
}
}  // namespace

int main(int argc, char** argv) {
  ringflow::mpi::environment env(argc, argv);
  auto comm = ringflow::mpi::world();
  std::int64_t rows = 100000;
  std::size_t dim = 16;
  double density = 0.01;
  int reps = 21;
  // --reduction: sparse by default (and then without the table's rows).
  ringflow::sparse_allreduce_options opt{.reduction = ringflow::sparse_reduction::sparse};
  try {
    ringflow::tool_flags::reader flags(argc, argv);
    while (flags.next()) {
      const std::string& arg = flags.flag();
      if (flags.is("--help", "-h")) {
        if (comm.rank() == 0) {
          std::printf(
              "usage: mpirun -np N sparse_bench [--rows N] [--dim N] [--density X] [--reps R]\n"
              "  --rows     table rows (default 100000)      --dim   row width (default 16)\n"
              "  --density  share of rows each rank touches, in (0, 1] (default 0.01)\n"
              "  --reps     interleaved repetitions, medians reported (default 21)\n"
              "  --reduction sparse|auto|dense  sparse_allreduce's path (default sparse; auto\n"
              "             and dense pass the table's rows, so it may or must reduce densely)\n");
        }
        return 0;
      } else if (arg == "--rows") {
        rows = flags.integer(1, 1LL << 26);
      } else if (arg == "--dim") {
        dim = static_cast<std::size_t>(flags.integer(1, 4096));
      } else if (arg == "--density") {
        density = flags.number(0, 1, /*lo_open=*/true);
      } else if (arg == "--reduction") {
        const std::string v = flags.value();
        if (v == "sparse") {
          opt.reduction = ringflow::sparse_reduction::sparse;
        } else if (v == "auto") {
          opt.reduction = ringflow::sparse_reduction::automatic;
        } else if (v == "dense") {
          opt.reduction = ringflow::sparse_reduction::dense;
        } else {
          throw ringflow::tool_flags::bad_flag(
              fmt::format("--reduction takes sparse, auto or dense, not '{}'", v));
        }
      } else if (arg == "--reps") {
        reps = static_cast<int>(flags.integer(1, 100000));
      } else {
        flags.unknown();
      }
    }
  } catch (const ringflow::tool_flags::bad_flag& e) {
    return comm.rank() == 0 ? ringflow::tool_flags::report("sparse_bench", e)
                            : ringflow::tool_flags::bad_flag_status;
  }
  if (opt.reduction != ringflow::sparse_reduction::sparse) {
    opt.table_rows = static_cast<std::size_t>(rows);
  }
  const int rank = comm.rank(), np = comm.size();
  const auto touched =
      std::max<std::int64_t>(1, static_cast<std::int64_t>(density * static_cast<double>(rows)));
  // This rank's distinct rows: a seeded shuffle's first `touched`.
  std::vector<std::int64_t> ids(static_cast<std::size_t>(rows));
  std::iota(ids.begin(), ids.end(), std::int64_t{0});
  std::mt19937_64 rng(1234 + static_cast<std::uint64_t>(rank));
  std::shuffle(ids.begin(), ids.end(), rng);
  ids.resize(static_cast<std::size_t>(touched));
  std::vector<float> values(ids.size() * dim);
  for (std::size_t i = 0; i < values.size(); ++i) values[i] = static_cast<float>(i % 97) * 0.01f;
  std::vector<float> dense(static_cast<std::size_t>(rows) * dim, 0.0f);

  std::vector<double> t_dense, t_sparse;
  std::size_t union_rows = 0;
  std::uint64_t sparse_bytes = 0;
  bool went_dense = false;
  for (int r = 0; r < reps + 1; ++r) {  // repetition 0 warms up, not counted
    double td = 0, ts = 0;
    auto run_dense = [&] {
      // The dense gradient a dense embedding backward leaves (scattered
      // outside the timed part: backward does that either way).
      std::fill(dense.begin(), dense.end(), 0.0f);
      for (std::size_t k = 0; k < ids.size(); ++k) {
        std::copy_n(values.data() + k * dim, dim,
                    dense.data() + static_cast<std::size_t>(ids[k]) * dim);
      }
      td = timed(comm, [&] { ringflow::allreduce(comm, std::span<float>(dense), ringflow::sum); });
    };
    auto run_sparse = [&] {
      ts = timed(comm, [&] {
        auto out = ringflow::sparse_allreduce<float>(comm, std::span<const std::int64_t>(ids),
                                                     std::span<const float>(values), dim, opt);
        union_rows = out.indices.size();
        went_dense = out.dense;
        sparse_bytes = ringflow::sparse_allreduce_bytes_sent(out, rank);
      });
    };
    if (r % 2 == 0) {
      run_dense();
      run_sparse();
    } else {
      run_sparse();
      run_dense();
    }
    if (r > 0) {
      t_dense.push_back(td);
      t_sparse.push_back(ts);
    }
  }
  if (rank == 0) {
    const double md = median(t_dense), ms = median(t_sparse);
    const auto dense_bytes =
        ringflow::train::ring_bytes_sent(dense.size(), sizeof(float), np, 0, true, true);
    fmt::print(
        "sparse_bench: {} ranks, table {} x {} ({:.1f} MiB), {} rows per rank ({:.2f}%), {} rows "
        "after the reduction, {} interleaved repetitions\n",
        np, rows, dim, static_cast<double>(dense.size()) * 4 / (1 << 20), touched,
        100.0 * static_cast<double>(touched) / static_cast<double>(rows), union_rows, reps);
    fmt::print("| reduction | median ms | bytes sent by rank 0 |\n|---|---|---|\n");
    fmt::print("| dense allreduce (sum, automatic algorithm) | {:.3f} | {} |\n", md * 1e3,
               dense_bytes);
    fmt::print("| sparse_allreduce ({} path) | {:.3f} | {} |\n", went_dense ? "dense" : "sparse",
               ms * 1e3, sparse_bytes);
    fmt::print("ratio dense/sparse: time {:.1f}x, bytes {:.1f}x\n", ms > 0 ? md / ms : 0.0,
               sparse_bytes > 0
                   ? static_cast<double>(dense_bytes) / static_cast<double>(sparse_bytes)
                   : 0.0);
  }
  return 0;
}
