// Tuning tables under mpirun -np 1..5: every rank follows rank 0's table
// whatever its own file says, automatic can pick shm from it, and a
// declining shm hands the call back to automatic's next choice.
#include <cstdio>
#include <cstdlib>
#include <string>

#include "ringflow/backends/mpi.hpp"
#include "ringflow/backends/shm.hpp"
#include "ringflow/coll/explain.hpp"
#include "ringflow/coll/registry.hpp"
#include "ringflow/coll/tuning.hpp"
#include "support/catch.hpp"
#include "support/coll_checks.hpp"
#include "support/collect.hpp"

using namespace ringflow;
using ringflow::testing::failures;
using ringflow::testing::require_none;
using ringflow::testing::scoped_env;

namespace {

// A table for `shape` in which `winner` is fastest at every size.
tuning_file table_with_winner(const cluster_shape& shape, algo winner) {
  tuning_table t;
  t.ranks = shape.ranks;
  t.nodes = shape.nodes;
  t.ranks_per_node = shape.ranks_per_node;
  for (std::size_t bytes : {std::size_t{4096}, std::size_t{1} << 20}) {
    tuning_row r;
    r.bytes = bytes;
    r.best = winner;
    for (algo a : {algo::ring, algo::halving_doubling, algo::tree, algo::shm}) {
      r.median.push_back({a, a == winner ? 1e-6 : 5e-6});
    }
    t.rows.push_back(r);
  }
  tuning_file f;
  f.machine = tuning_host();
  f.put(t);
  return f;
}

cluster_shape world_shape() {
  scoped_env off("RINGFLOW_TUNING", "off");
  auto c = mpi::world();
  return explain(c, 0).shape;
}

bool declining_shm(const communicator&, void*, const void*, std::size_t, dtype, op_kind) {
  return false;
}

}  // namespace

TEST_CASE("mpi: every rank takes rank 0's tuning table, and automatic may pick shm from it",
          "[mpi][tuning]") {
  auto world = mpi::world();
  const cluster_shape shape = world_shape();
  // Rank 0's table says shm; the others' say tree. All must run shm.
  const algo mine = world.rank() == 0 ? algo::shm : algo::tree;
  const std::string path = fmt::format("ringflow_test_tuning_rank{}.json", world.rank());
  save_tuning_file(table_with_winner(shape, mine), path);
  failures f;
  {
    scoped_env env("RINGFLOW_TUNING", path.c_str());
    auto fresh = mpi::world();
    const explanation e = explain(fresh, 65536);
    if (fresh.size() > 1) {
      const algo expected = shape.shm ? algo::shm : algo::ring;  // shm needs one node
      if (!e.from_table || e.choice != expected) {
        f.push_back(fmt::format("rank {}: {}", world.rank(), e.to_string()));
      }
      if (e.table_origin != "ringflow_test_tuning_rank0.json") {
        f.push_back(fmt::format("rank {}: table from {}", world.rank(), e.table_origin));
      }
    }
    // And the automatic allreduce runs it correctly, in and out of place.
    testing::check_allreduce<float>(fresh, 4099, sum, false, coll_options{}, f);
    testing::check_allreduce<std::int32_t>(fresh, 100000, max, true, coll_options{}, f);
    testing::check_allreduce<double>(fresh, 1001, avg, false, coll_options{}, f);
  }
  std::remove(path.c_str());
  require_none(f);
}

TEST_CASE("mpi: a shm allreduce that declines hands automatic's call to its next choice",
          "[mpi][tuning]") {
  auto world = mpi::world();
  const cluster_shape shape = world_shape();
  const std::string path = fmt::format("ringflow_test_tuning_decline{}.json", world.rank());
  save_tuning_file(table_with_winner(shape, algo::shm), path);
  const auto saved = ext::registered_algorithm(algo::shm);
  const auto saved_cost = ext::registered_cost(algo::shm);
  ext::register_algorithm(algo::shm, &declining_shm, saved_cost);
  failures f;
  {
    scoped_env env("RINGFLOW_TUNING", path.c_str());
    auto fresh = mpi::world();
    testing::check_allreduce<float>(fresh, 4099, sum, false, coll_options{}, f);
    testing::check_allreduce<float>(fresh, 4099, sum, true, coll_options{}, f);
    if (fresh.size() > 1 && explain(fresh, 4096).choice == algo::shm) {
      f.push_back(fmt::format("rank {}: still offers shm after it declined", world.rank()));
    }
  }
  ext::register_algorithm(algo::shm, saved, saved_cost);
  std::remove(path.c_str());
  require_none(f);
}
