// The allreduce algorithm table: one row per algorithm with everything the
// library knows about it (its name and aliases, the bench's column label,
// whether and where algo::automatic may pick it, its cost-model formula and
// its type-erased runner). algo_name, parse_algo, the cost model, explain(),
// algo::automatic's candidates, ringflow-bench --algo all and the tests all
// read this table; adding an algorithm is its file (the template, the
// runner, the cost function), one enum value and one row
// (docs/collectives.md, "Adding an algorithm").
#pragma once

#include <array>
#include <cstddef>
#include <span>
#include <string_view>

#include "ringflow/coll/options.hpp"
#include "ringflow/core/dtype.hpp"
#include "ringflow/core/reduce_op.hpp"

namespace ringflow {

class communicator;
struct cost_model;
struct cluster_shape;

/// A type-erased allreduce: `count` elements of `type` from `in` into `out`
/// (in == out: in place) reduced with `op`; `opt` is what the caller asked
/// for (segment size). Called after the collective began (sequence, checks).
using allreduce_runner = void (*)(const communicator& comm, void* out, const void* in,
                                  std::size_t count, dtype type, op_kind op,
                                  const coll_options& opt);

/// The model's seconds for an allreduce of `bytes` on `shape` (more than
/// one rank), or negative when the algorithm cannot serve that shape.
/// `segment_bytes` 0 means the algorithm's default.
using allreduce_cost = double (*)(const cost_model& m, const cluster_shape& shape,
                                  std::size_t bytes, std::size_t segment_bytes);

struct algorithm_info {
  algo id;
  std::string_view name;                    ///< algo_name(): in explain(), tables, flight records
  std::string_view label;                   ///< ringflow-bench's column header
  std::array<std::string_view, 2> aliases;  ///< more names parse_algo accepts ("" unused)
  bool automatic;                           ///< algo::automatic may pick it ...
  bool (*eligible)(const cluster_shape&);   ///< ... where this says so (null: any shape)
  allreduce_cost cost;   ///< null: the cost a backend registered (ext::register_algorithm)
  allreduce_runner run;  ///< null: run by the communicator's backend (native, registered)
};

/// Every algorithm, in the order the cost model prefers on a tie (the
/// simpler first); algo::automatic itself is the last row.
std::span<const algorithm_info> allreduce_algorithms() noexcept;

/// The row of `a` (every enum value has one: checked at compile time).
const algorithm_info& algorithm_info_of(algo a) noexcept;

}  // namespace ringflow
