// ringflow-bench entry for the allreduce algorithms beyond ring/native/auto:
// recursive_doubling, halving_doubling, tree, double_tree, hierarchical, and
// "all" (every algorithm at each size, interleaved: bench/algo_sweep.cpp).
// (shm has its own entry, bench/colls/shm_allreduce.cpp.)
#include "allreduce_entry.hpp"

RINGFLOW_BENCH_REGISTER(::ringflow::bench::allreduce_entry(
    {"recursive_doubling", "halving_doubling", "tree", "double_tree", "hierarchical", "all"}))
