// ringflow-bench --calibrate: measures the cost model's parameters here and
// saves them. alpha and beta come from ping-pong over ringflow's own
// transport (what the algorithms pay per message and per byte), between two
// ranks of one node and, when the layout has several nodes, between nodes;
// gamma from a timed float-sum reduction on one core.
#include <fmt/format.h>
#include <mpi.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <vector>

#include "modes.hpp"
#include "ringflow/coll/context.hpp"
#include "ringflow/coll/cost_model.hpp"
#include "ringflow/coll/fold.hpp"

namespace ringflow::bench {
namespace {

constexpr int pingpong_tag = 77;

double median_of(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// One-way time of a `bytes` message between ranks a and b (half the round
// trip), median of `reps` timings of `iters` round trips; the same on all ranks.
double one_way_seconds(const communicator& comm, MPI_Comm mpi, int a, int b, std::size_t bytes,
                       int iters, int reps) {
  transport& t = comm.raw();
  std::vector<char> buf(std::max<std::size_t>(bytes, 1));
  std::vector<double> times;
  for (int rep = 0; rep < reps; ++rep) {
    MPI_Barrier(mpi);
    const auto t0 = std::chrono::steady_clock::now();
    if (comm.rank() == a) {
      for (int i = 0; i < iters; ++i) {
        t.isend(buf.data(), bytes, b, pingpong_tag).wait();
        t.irecv(buf.data(), bytes, b, pingpong_tag).wait();
      }
    } else if (comm.rank() == b) {
      for (int i = 0; i < iters; ++i) {
        t.irecv(buf.data(), bytes, a, pingpong_tag).wait();
        t.isend(buf.data(), bytes, a, pingpong_tag).wait();
      }
    }
    double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() /
               (2.0 * iters);
    MPI_Bcast(&s, 1, MPI_DOUBLE, a, mpi);
    times.push_back(s);
  }
  return median_of(times);
}

// alpha: the smallest message; beta: least-squares slope over large ones.
link_cost fit_link(const communicator& comm, MPI_Comm mpi, int a, int b, int reps) {
  link_cost l;
  l.alpha = one_way_seconds(comm, mpi, a, b, 8, 2000, reps);
  std::vector<double> xs, ys;
  for (std::size_t bytes : {std::size_t{64} << 10, std::size_t{256} << 10, std::size_t{1} << 20,
                            std::size_t{4} << 20}) {
    const int iters = static_cast<int>(std::max<std::size_t>(10, (std::size_t{64} << 20) / bytes / 4));
    xs.push_back(static_cast<double>(bytes));
    ys.push_back(one_way_seconds(comm, mpi, a, b, bytes, iters, reps));
  }
  double mx = 0, my = 0;
  for (std::size_t i = 0; i < xs.size(); ++i) mx += xs[i] / xs.size(), my += ys[i] / ys.size();
  double sxy = 0, sxx = 0;
  for (std::size_t i = 0; i < xs.size(); ++i) {
    sxy += (xs[i] - mx) * (ys[i] - my);
    sxx += (xs[i] - mx) * (xs[i] - mx);
  }
  l.beta = std::max(0.0, sxy / sxx);
  return l;
}

// Seconds per byte of dst = op(a, b) over floats, median of a few timings.
double reduce_seconds_per_byte(int reps) {
  const std::size_t n = std::size_t{1} << 20;  // 4 MiB: out of the small caches
  std::vector<float> x(n, 1.5f), y(n, 2.5f), z(n);
  std::vector<double> times;
  for (int rep = 0; rep < reps; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int k = 0; k < 10; ++k) detail::combine_to(z.data(), x.data(), y.data(), n, sum_op{});
    times.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() /
                    (10.0 * n * sizeof(float)));
    if (z[n / 2] != 4.0f) std::abort();  // keeps the loop from being optimized away
  }
  return median_of(times);
}

}  // namespace

int run_calibration(const communicator& comm, MPI_Comm mpi, const bench_cli& cli) {
  const int rank = comm.rank(), p = comm.size();
  if (p < 2) {
    throw bad_flag("--calibrate needs at least 2 ranks (mpirun -np 2 or more)");
  }
  const auto ctx = detail::context_of(comm);
  const topology& topo = ctx->topo;
  const int reps = std::max(3, cli.reps);
  cost_model m;
  // Two ranks of one node, if any node has two; else the first two ranks.
  int a = 0, b = 1;
  for (const auto& node : topo.nodes) {
    if (node.size() >= 2) {
      a = node[0], b = node[1];
      break;
    }
  }
  m.intra = fit_link(comm, mpi, a, b, reps);
  if (topo.node_count() > 1) {
    m.inter = fit_link(comm, mpi, topo.nodes[0][0], topo.nodes[1][0], reps);
  } else {
    m.inter = m.intra;
  }
  double g = reduce_seconds_per_byte(reps);
  MPI_Bcast(&g, 1, MPI_DOUBLE, 0, mpi);
  m.gamma = g;
  char host[256] = {};
  gethostname(host, sizeof host - 1);
  m.machine = fmt::format("{}: {} ranks, {}, calibrated with ringflow-bench --calibrate", host, p,
                          topo.describe());
  int ok = 1;
  if (rank == 0) {
    const std::string path = cost_model_path();
    try {
      save_cost_model(m, path);
      fmt::print("# ringflow cost model for {}\n", m.machine);
      fmt::print("intra: alpha {:.3f} us, beta {:.4f} ns/B ({:.2f} GB/s)\n", m.intra.alpha * 1e6,
                 m.intra.beta * 1e9, m.intra.beta > 0 ? 1e-9 / m.intra.beta : 0.0);
      fmt::print("inter: alpha {:.3f} us, beta {:.4f} ns/B ({:.2f} GB/s){}\n", m.inter.alpha * 1e6,
                 m.inter.beta * 1e9, m.inter.beta > 0 ? 1e-9 / m.inter.beta : 0.0,
                 topo.node_count() > 1 ? "" : " (one node: same as intra)");
      fmt::print("gamma: {:.4f} ns/B ({:.2f} GB/s reduced)\n", m.gamma * 1e9,
                 m.gamma > 0 ? 1e-9 / m.gamma : 0.0);
      fmt::print("saved to {} (RINGFLOW_COST_MODEL overrides the path)\n", path);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "ringflow-bench: error: %s\n", e.what());
      ok = 0;
    }
  }
  MPI_Bcast(&ok, 1, MPI_INT, 0, mpi);
  return ok ? 0 : 1;
}

}  // namespace ringflow::bench
