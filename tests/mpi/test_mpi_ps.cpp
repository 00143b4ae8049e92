// ps::node over MPI (mpirun -np 1..5): sync equals a serial allreduce-average
// SGD reference (dedicated servers from 2 ranks, co-located at any count), and
// an async job runs to the end with every push applied; sparse rows equal
// the dense push bit for bit (SGD).
#include <cmath>
#include <cstring>
#include <vector>

#include "ringflow/backends/mpi.hpp"
#include "ringflow/coll/collectives.hpp"
#include "ringflow/ps/parameter_server.hpp"
#include "support/catch.hpp"

using namespace ringflow;

namespace {

std::vector<float> start(std::size_t n) {
  std::vector<float> v(n);
  for (std::size_t i = 0; i < n; ++i) v[i] = std::cos(0.21f * static_cast<float>(i));
  return v;
}

void grad(std::span<const float> p, int w, int t, std::span<float> g) {
  for (std::size_t i = 0; i < p.size(); ++i) {
    g[i] = 0.2f * p[i] +
           0.05f * std::sin(0.1f * static_cast<float>(i + 7 * static_cast<std::size_t>(w)) +
                            static_cast<float>(t));
  }
}

// Runs one job; returns the gathered parameters (every rank).
std::vector<float> run_job(const communicator& c, std::size_t numel, int steps, ps::options o) {
  const auto init = start(numel);
  ps::node n(c, init, o);
  std::vector<float> p = init, g(numel);
  if (n.is_worker()) {
    n.pull(p).wait();
    for (int t = 0; t < steps; ++t) {
      grad(p, n.worker_index(), t, g);
      n.push(g).wait();
      n.pull(p).wait();
    }
    n.finish();
  } else {
    n.serve();
  }
  n.gather_parameters(p);
  return p;
}

}  // namespace

TEST_CASE("mpi ps: sync equals allreduce-average SGD", "[mpi][ps]") {
  auto c = mpi::world();
  const std::size_t numel = 61;
  const int steps = 6;
  std::vector<ps::options> setups;
  if (c.size() >= 2) setups.push_back({.mode = ps::consistency::sync, .servers = 1});
  if (c.raw().concurrent_use_ok()) {
    setups.push_back({.mode = ps::consistency::sync, .where = ps::placement::colocated});
  }
  for (auto o : setups) {
    o.optimizer.sgd = {.lr = 0.1, .momentum = 0.9};
    const auto got = run_job(c, numel, steps, o);
    const int W = ps::layout(numel, c.size(), o).workers();
    // Serial reference: the average of W gradients, SGD with momentum.
    auto p = start(numel);
    std::vector<float> v(numel, 0.0f), g(numel), sum(numel);
    for (int t = 0; t < steps; ++t) {
      std::fill(sum.begin(), sum.end(), 0.0f);
      for (int w = 0; w < W; ++w) {
        grad(p, w, t, g);
        for (std::size_t i = 0; i < numel; ++i) sum[i] += g[i];
      }
      for (std::size_t i = 0; i < numel; ++i) {
        const float d = sum[i] / static_cast<float>(W);
        v[i] = t > 0 ? 0.9f * v[i] + d : d;
        p[i] -= 0.1f * v[i];
      }
    }
    for (std::size_t i = 0; i < numel; ++i) REQUIRE(std::abs(got[i] - p[i]) <= 1e-6);
  }
}

TEST_CASE("mpi ps: async runs to the end", "[mpi][ps]") {
  auto c = mpi::world();
  if (c.size() < 2) return;  // needs a server and a worker
  ps::options o{.mode = ps::consistency::async, .servers = c.size() >= 4 ? 2 : 1};
  const auto p = run_job(c, 50, 5, o);
  for (float x : p) REQUIRE(std::isfinite(x));
}

TEST_CASE("mpi ps: a sync sparse push equals the dense push with zero rows (bitwise)",
          "[mpi][ps][sparse]") {
  auto c = mpi::world();
  // A dense head of 11, a table of 30 rows x 3, a dense tail of 5.
  constexpr std::size_t head = 11, rows = 30, width = 3, numel = head + rows * width + 5;
  const int steps = 5;
  std::vector<ps::options> setups;
  if (c.size() >= 2) setups.push_back({.mode = ps::consistency::sync, .servers = 1});
  if (c.size() >= 4) setups.push_back({.mode = ps::consistency::sync, .servers = 2});
  if (c.raw().concurrent_use_ok()) {
    setups.push_back({.mode = ps::consistency::sync, .where = ps::placement::colocated});
  }
  for (auto o : setups) {
    o.optimizer.sgd = {.lr = 0.1, .momentum = 0.0};
    std::vector<std::vector<float>> results;
    for (const bool sparse : {false, true}) {
      ps::options oj = o;
      if (sparse) oj.tables = {{.offset = head, .rows = rows, .width = width}};
      const auto init = start(numel);
      ps::node n(c, init, oj);
      std::vector<float> p = init, g(numel), rv;
      if (n.is_worker()) {
        const int w = n.worker_index();
        for (int t = 0; t < steps; ++t) {
          std::vector<std::int64_t> ids;
          for (int j = 0; j < 4; ++j) ids.push_back((5 * w + 2 * t + j * j) % 30);
          ids.push_back(ids.front());
          const std::span<const std::int64_t> want(ids);
          if (sparse) {
            n.pull_sparse(p, std::span(&want, 1)).wait();
          } else {
            n.pull(p).wait();
          }
          grad(p, w, t, g);
          for (std::size_t i = head; i < head + rows * width; ++i) g[i] = 0.0f;
          rv.clear();
          for (std::size_t k = 0; k < ids.size(); ++k) {
            for (std::size_t j = 0; j < width; ++j) {
              rv.push_back(0.3f * p[head + static_cast<std::size_t>(ids[k]) * width + j] +
                           0.01f * static_cast<float>(k + j + static_cast<std::size_t>(t)));
            }
          }
          if (sparse) {
            const ps::table_rows tr{ids, rv};
            n.push_sparse(g, std::span(&tr, 1)).wait();
          } else {
            for (std::size_t k = 0; k < ids.size(); ++k) {
              for (std::size_t j = 0; j < width; ++j)
                g[head + static_cast<std::size_t>(ids[k]) * width + j] += rv[k * width + j];
            }
            n.push(g).wait();
          }
        }
        n.finish();
      } else {
        n.serve();
      }
      n.gather_parameters(p);
      results.push_back(p);
    }
    REQUIRE(std::memcmp(results[0].data(), results[1].data(), numel * sizeof(float)) == 0);
  }
}
