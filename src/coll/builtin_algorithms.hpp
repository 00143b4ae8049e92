// The built-in allreduce algorithms' rows of the table (algorithms.cpp):
// their cost-model formulas (cost_model.cpp) and type-erased runners
// (instantiate_algorithms.cpp). Private to src/coll.
#pragma once

#include <cstddef>

#include "ringflow/coll/algorithms.hpp"

namespace ringflow::detail {

double ring_cost(const cost_model&, const cluster_shape&, std::size_t bytes, std::size_t seg);
double recursive_doubling_cost(const cost_model&, const cluster_shape&, std::size_t bytes,
                               std::size_t seg);
double halving_doubling_cost(const cost_model&, const cluster_shape&, std::size_t bytes,
                             std::size_t seg);
double tree_cost(const cost_model&, const cluster_shape&, std::size_t bytes, std::size_t seg);
double double_tree_cost(const cost_model&, const cluster_shape&, std::size_t bytes,
                        std::size_t seg);
double hierarchical_cost(const cost_model&, const cluster_shape&, std::size_t bytes,
                         std::size_t seg);

void run_ring(const communicator&, void* out, const void* in, std::size_t count, dtype, op_kind,
              const coll_options&);
void run_recursive_doubling(const communicator&, void* out, const void* in, std::size_t count,
                            dtype, op_kind, const coll_options&);
void run_halving_doubling(const communicator&, void* out, const void* in, std::size_t count, dtype,
                          op_kind, const coll_options&);
void run_tree(const communicator&, void* out, const void* in, std::size_t count, dtype, op_kind,
              const coll_options&);
void run_double_tree(const communicator&, void* out, const void* in, std::size_t count, dtype,
                     op_kind, const coll_options&);
void run_hierarchical(const communicator&, void* out, const void* in, std::size_t count, dtype,
                      op_kind, const coll_options&);

}  // namespace ringflow::detail
