// Bit identity with NaN payloads, +-Inf, -0 and denormals over MPI (mpirun
// -np 1..5): every allreduce algorithm, shm where all ranks share a node,
// reduce_scatter + allgather, with emulated nodes (RINGFLOW_NODE_SIZE) off
// and on.
#include <vector>

#include "ringflow/backends/mpi.hpp"
#include "ringflow/backends/shm.hpp"
#include "ringflow/coll/explain.hpp"
#include "support/bit_identity.hpp"
#include "support/catch.hpp"
#include "support/collect.hpp"

using namespace ringflow;
using ringflow::testing::failures;
using ringflow::testing::require_none;

TEST_CASE("mpi: awkward inputs give the same bits on every rank after every algorithm",
          "[mpi][algorithms][bit_identity]") {
  for (const char* node_size : {static_cast<const char*>(nullptr), "2", "4"}) {
    INFO("RINGFLOW_NODE_SIZE=" << (node_size ? node_size : "(unset)"));
    testing::scoped_env env("RINGFLOW_NODE_SIZE", node_size);
    auto world = mpi::world();  // a fresh communicator: its context is built with this layout
    failures f;
    if (node_size && world.size() > 1) {
      const int k = node_size[0] - '0';
      const int nodes = (world.size() + k - 1) / k;
      const explanation e = explain(world, 1 << 20);
      if (e.shape.nodes != nodes) {
        f.push_back(fmt::format("rank {}: the context sees {} nodes, want {}", world.rank(),
                                e.shape.nodes, nodes));
      }
    }
    std::vector<algo> algos(std::begin(testing::identity_algorithms),
                            std::end(testing::identity_algorithms));
    if (shm::usable(world)) algos.push_back(algo::shm);
    testing::check_bit_identity_everything(world, algos, f);
    // The reported case on its own, so a failure names it first.
    testing::check_bit_identity<float>(world, algo::recursive_doubling, 4013, prod, f);
    testing::check_bit_identity<double>(world, algo::recursive_doubling, 8191, sum, f);
    // Rank 0 never differs from itself: fail on every rank together, so no
    // rank goes on to the next layout's collectives alone.
    std::vector<int> failed{f.empty() ? 0 : 1};
    allreduce(world, std::span<int>(failed), max, algo::ring);
    if (failed[0] && f.empty()) {
      f.push_back(fmt::format("rank {}: another rank failed", world.rank()));
    }
    require_none(f);
  }
}
