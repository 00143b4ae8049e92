// Every allreduce algorithm over MPI (mpirun -np 1..5): the sampled
// correctness matrix, emulated nodes for the hierarchical one, and the
// automatic choice agreeing across ranks whose cost-model files differ.
#include <cstdio>
#include <cstdlib>
#include <string>

#include "ringflow/backends/mpi.hpp"
#include "ringflow/coll/cost_model.hpp"
#include "ringflow/coll/explain.hpp"
#include "support/catch.hpp"
#include "support/coll_checks.hpp"
#include "support/collect.hpp"

using namespace ringflow;
using ringflow::testing::failures;
using ringflow::testing::require_none;

TEST_CASE("mpi: every allreduce algorithm matches the serial reference", "[mpi][algorithms]") {
  auto world = mpi::world();
  for (algo a : testing::transport_algorithms()) {
    INFO(algo_name(a));
    failures f;
    testing::check_algorithm(world, a, f);
    testing::check_signed_zero_agreement(world, a, f);
    require_none(f);
  }
}

TEST_CASE("mpi: hierarchical allreduce on emulated nodes of 2", "[mpi][algorithms]") {
  setenv("RINGFLOW_NODE_SIZE", "2", 1);
  auto world = mpi::world();  // a fresh communicator: its context is built now
  failures f;
  testing::check_algorithm_op<float>(world, algo::hierarchical, sum, f);
  testing::check_algorithm_op<std::int32_t>(world, algo::hierarchical, avg, f);
  testing::check_algorithm_all_ops_one_count<half>(world, algo::hierarchical, 1000, f);
  const explanation e = explain(world, 1 << 20);
  if (e.shape.nodes != (world.size() + 1) / 2) {
    f.push_back(fmt::format("rank {}: explain sees {} nodes", world.rank(), e.shape.nodes));
  }
  unsetenv("RINGFLOW_NODE_SIZE");
  require_none(f);
}

TEST_CASE("mpi: 10^6+3 floats through every algorithm, identical bits on every rank",
          "[mpi][algorithms]") {
  auto world = mpi::world();
  failures f;
  for (algo a : testing::transport_algorithms())
    testing::check_large_bitwise_algo(world, a, 1000003, f);
  require_none(f);
}

TEST_CASE("mpi: every rank takes rank 0's cost model, whatever its own file says",
          "[mpi][cost_model]") {
  auto world = mpi::world();
  // Rank 0: latency is dear (the fewest waits: recursive doubling, or shm
  // on a non-power-of-two count, whose fold costs doubling two more); the
  // others: a model that would pick something else. All must follow rank 0.
  cost_model m, rank0;
  rank0.intra = {1.0, 1e-12};
  rank0.inter = rank0.intra;
  rank0.gamma = 1e-12;
  if (world.rank() == 0) {
    m = rank0;
  } else {
    m.intra = {1e-9, 1e-6};
    m.inter = m.intra;
    m.gamma = 1e-12;
  }
  const std::string path = fmt::format("ringflow_test_model_rank{}.json", world.rank());
  save_cost_model(m, path);
  setenv("RINGFLOW_COST_MODEL", path.c_str(), 1);
  // The model alone decides (a tuning table on this machine would win).
  testing::scoped_env no_table("RINGFLOW_TUNING", "off");
  auto fresh = mpi::world();
  const explanation e = explain(fresh, 1 << 20);
  const algo expected = choose_algorithm(rank0, e.shape, 1 << 20).choice;
  failures f;
  if (world.size() > 1 && e.choice != expected) {
    f.push_back(fmt::format("rank {}: picked {}, rank 0's model picks {}", world.rank(),
                            algo_name(e.choice), algo_name(expected)));
  }
  if (world.rank() != 0 && choose_algorithm(m, e.shape, 1 << 20).choice == expected) {
    f.push_back(fmt::format("rank {}: its own model picks {} too: the test proves nothing",
                            world.rank(), algo_name(expected)));
  }
  if (world.size() > 1 && expected != algo::recursive_doubling && expected != algo::shm) {
    f.push_back(fmt::format("rank 0's latency-bound model picks {}", algo_name(expected)));
  }
  if (e.model_origin != "ringflow_test_model_rank0.json" && world.size() > 1) {
    f.push_back(fmt::format("rank {}: model from {}", world.rank(), e.model_origin));
  }
  // And the automatic allreduce runs it correctly.
  testing::check_allreduce<float>(fresh, 4099, sum, false, coll_options{}, f);
  unsetenv("RINGFLOW_COST_MODEL");
  std::remove(path.c_str());
  require_none(f);
}
