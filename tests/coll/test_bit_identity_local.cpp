// Bit identity with NaN payloads, +-Inf, -0 and denormals on the thread
// backend: every allreduce algorithm (and reduce_scatter + allgather) on
// 1..8 ranks, with emulated nodes (RINGFLOW_NODE_SIZE) off and on.
#include <string>

#include "ringflow/backends/local.hpp"
#include "ringflow/coll/explain.hpp"
#include "support/bit_identity.hpp"
#include "support/catch.hpp"
#include "support/collect.hpp"

using namespace ringflow;
using ringflow::testing::failures;
using ringflow::testing::require_none;
using ringflow::testing::run_collecting;
using ringflow::testing::scoped_env;

TEST_CASE("awkward inputs: every rank holds the same bits after every algorithm",
          "[coll][local][algorithms][bit_identity][sweep]") {
  // nullptr: no emulation (one node: the host names agree); 3 makes unequal nodes.
  for (const char* node_size : {static_cast<const char*>(nullptr), "2", "3", "4"}) {
    scoped_env env("RINGFLOW_NODE_SIZE", node_size);
    for (int p = 1; p <= 8; ++p) {
      INFO("RINGFLOW_NODE_SIZE=" << (node_size ? node_size : "(unset)") << ", " << p << " ranks");
      const int size = node_size ? std::stoi(node_size) : p;
      const int nodes = (p + size - 1) / size;
      require_none(run_collecting(p, [nodes](communicator& c, failures& f) {
        // The emulated layout must reach the algorithms (it is read once per
        // communicator, from rank 0's environment).
        const explanation e = explain(c, 1 << 20);
        if (c.size() > 1 && e.shape.nodes != nodes) {
          f.push_back(fmt::format("rank {}: the context sees {} nodes, want {}", c.rank(),
                                  e.shape.nodes, nodes));
        }
        testing::check_bit_identity_everything(c, testing::identity_algorithms, f);
      }));
    }
  }
}

TEST_CASE("awkward inputs: the reported case (recursive doubling, float prod, 4013 elements)",
          "[coll][local][algorithms][bit_identity]") {
  for (const char* node_size : {static_cast<const char*>(nullptr), "2", "4"}) {
    scoped_env env("RINGFLOW_NODE_SIZE", node_size);
    for (int p : {4, 5, 6}) {
      INFO("RINGFLOW_NODE_SIZE=" << (node_size ? node_size : "(unset)") << ", " << p << " ranks");
      require_none(run_collecting(p, [](communicator& c, failures& f) {
        testing::check_bit_identity<float>(c, algo::recursive_doubling, 4013, prod, f);
        testing::check_bit_identity<double>(c, algo::recursive_doubling, 8191, sum, f);
      }));
    }
  }
}
