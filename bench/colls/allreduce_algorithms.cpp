// ringflow-bench entry for the allreduce algorithms beyond ring/native/auto:
// every built-in row of the algorithm table (coll/algorithms.hpp) but the
// ring (recursive_doubling, halving_doubling, tree, double_tree,
// hierarchical, and any added later), and "all" (every algorithm at each
// size, interleaved: bench/algo_sweep.cpp). (shm has its own entry,
// bench/colls/shm_allreduce.cpp.)
#include <string>
#include <vector>

#include "allreduce_entry.hpp"
#include "ringflow/coll/algorithms.hpp"

namespace ringflow::bench {
namespace {
std::vector<std::string> table_algorithms() {
  std::vector<std::string> names;
  for (const algorithm_info& info : allreduce_algorithms()) {
    if (info.run != nullptr && info.id != algo::ring) names.emplace_back(info.name);
  }
  names.emplace_back("all");
  return names;
}
}  // namespace
}  // namespace ringflow::bench

RINGFLOW_BENCH_REGISTER(::ringflow::bench::allreduce_entry(::ringflow::bench::table_algorithms()))
