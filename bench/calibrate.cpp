// ringflow-bench --calibrate: measures the cost model's parameters here and
// saves them. alpha and beta come from timed message exchanges over
// ringflow's own transport (what the algorithms pay per message and per
// byte), small ones for alpha, a least-squares slope over large ones for beta, between two
// ranks of one node and, when the layout has several nodes, between nodes;
// gamma from a timed float-sum reduction on one core.
#include <fmt/format.h>
#include <mpi.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "modes.hpp"
#include "ringflow/coll/context.hpp"
#include "ringflow/coll/cost_model.hpp"
#include "ringflow/coll/fold.hpp"
#include "ringflow/core/env.hpp"

namespace ringflow::bench {
namespace {

constexpr int pingpong_tag = 77;

// The fastest repetition: on a shared machine other work only ever adds
// time, so the minimum is the best estimate of what the hardware does.
double fastest(const std::vector<double>& v) { return *std::min_element(v.begin(), v.end()); }

// Time of one exchange of `bytes` between ranks a and b (each sends one
// message to the other), the fastest of `reps` timings of `iters` exchanges;
// the same on all ranks.
double exchange_seconds(const communicator& comm, MPI_Comm mpi, int a, int b, std::size_t bytes,
                        int iters, int reps) {
  transport& t = comm.raw();
  std::vector<char> buf(std::max<std::size_t>(bytes, 1)), rbuf(buf.size());
  std::vector<double> times;
  for (int rep = 0; rep < reps; ++rep) {
    MPI_Barrier(mpi);
    const auto t0 = std::chrono::steady_clock::now();
    if (comm.rank() == a || comm.rank() == b) {
      // Both directions at once, receive posted first: the pattern of every
      // step of the ring, recursive doubling and halving-doubling (a strict
      // ping-pong measures the MPI rendezvous handshake instead).
      const int peer = comm.rank() == a ? b : a;
      for (int i = 0; i < iters; ++i) {
        request rq = t.irecv(rbuf.data(), bytes, peer, pingpong_tag);
        request sq = t.isend(buf.data(), bytes, peer, pingpong_tag);
        rq.wait();
        sq.wait();
      }
    }
    double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / iters;
    MPI_Bcast(&s, 1, MPI_DOUBLE, a, mpi);
    times.push_back(s);
  }
  return fastest(times);
}

// alpha: an 8-byte exchange; beta: the slope between a 64 KiB and a 1 MiB
// exchange (both in the transport's large-message regime, which is where
// the algorithms' segments live; smaller messages take a different protocol
// in most MPIs and would bend a least-squares line).
link_cost fit_link(const communicator& comm, MPI_Comm mpi, int a, int b, int reps) {
  link_cost l;
  l.alpha = exchange_seconds(comm, mpi, a, b, 8, 2000, reps);
  const std::size_t small = std::size_t{64} << 10, large = std::size_t{1} << 20;
  const double ts = exchange_seconds(comm, mpi, a, b, small, 256, reps);
  const double tl = exchange_seconds(comm, mpi, a, b, large, 32, reps);
  if (comm.rank() == 0 && env::flag("RINGFLOW_CALIBRATE_VERBOSE", false, env::malformed::warn)) {
    fmt::print("#   {} <-> {}: 8 B {:.2f} us, 64 KiB {:.2f} us, 1 MiB {:.2f} us\n", a, b,
               l.alpha * 1e6, ts * 1e6, tl * 1e6);
  }
  l.beta = std::max(0.0, (tl - ts) / static_cast<double>(large - small));
  // The large-message line's intercept is the rendezvous alpha; the first
  // size that sits closer to that line than to the small-message one is
  // where the transport switches protocol.
  l.large_alpha = std::max(l.alpha, ts - static_cast<double>(small) * l.beta);
  l.large_from = static_cast<double>(small);
  for (std::size_t bytes = 512; bytes < small; bytes *= 2) {
    const double tb = exchange_seconds(comm, mpi, a, b, bytes, 500, reps);
    const double b_d = static_cast<double>(bytes);
    if (tb > l.alpha + b_d * l.beta + 0.5 * (l.large_alpha - l.alpha)) {
      l.large_from = b_d;
      break;
    }
  }
  return l;
}

// Seconds per byte of acc = op(acc, incoming) over floats, as the
// algorithms reduce (in place, out of cache), fastest of a few timings.
double reduce_seconds_per_byte(int reps) {
  const std::size_t n = std::size_t{4} << 20;  // 16 MiB per buffer: out of the caches
  std::vector<float> acc(n, 0.0f), in(n, 1.0f);
  std::vector<double> times;
  int rounds = 0;
  for (int rep = 0; rep < reps; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int k = 0; k < 4; ++k, ++rounds) {
      detail::combine_to(acc.data(), static_cast<const float*>(acc.data()), in.data(), n, sum_op{});
    }
    times.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() /
                    (4.0 * static_cast<double>(n * sizeof(float))));
  }
  // Uses the result, so the loops cannot be dropped.
  if (acc[n / 3] != static_cast<float>(rounds)) std::abort();
  return fastest(times);
}

}  // namespace

int run_calibration(const communicator& comm, MPI_Comm mpi, const bench_cli& cli) {
  const int rank = comm.rank(), p = comm.size();
  if (p < 2) {
    throw bad_flag("--calibrate needs at least 2 ranks (mpirun -np 2 or more)");
  }
  const detail::comm_context* ctx = detail::context_of(comm);
  const topology& topo = ctx->topo;
  const int reps = std::max(7, cli.reps);
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
      auto show = [](const char* what, const link_cost& l, const char* note) {
        fmt::print(
            "{}: alpha {:.3f} us (from {:.0f} bytes: {:.3f} us), beta {:.4f} ns/B ({:.2f} "
            "GB/s){}\n",
            what, l.alpha * 1e6, l.large_from, l.large_alpha * 1e6, l.beta * 1e9,
            l.beta > 0 ? 1e-9 / l.beta : 0.0, note);
      };
      show("intra", m.intra, "");
      show("inter", m.inter, topo.node_count() > 1 ? "" : " (one node: same as intra)");
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
