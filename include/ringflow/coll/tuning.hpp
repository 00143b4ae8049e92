// Measured tuning tables for algo::automatic: `ringflow-bench --tune` times
// every allreduce algorithm at a range of sizes on this machine, for one
// rank count and node layout, and saves the medians; automatic then picks
// the measured fastest instead of the cost model's guess wherever a table
// matches (docs/collectives.md, "Tuning").
#pragma once

#include <cstddef>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "ringflow/coll/cost_model.hpp"
#include "ringflow/coll/options.hpp"

namespace ringflow {

/// One measured size: every algorithm's median time there.
struct tuning_row {
  std::size_t bytes = 0;
  algo best = algo::ring;               ///< the lowest median (as measured)
  std::vector<algo_prediction> median;  ///< seconds, in the order measured
};

/// The measurements for one rank count and node layout.
struct tuning_table {
  int ranks = 0;
  int nodes = 0;
  int ranks_per_node = 0;
  int cores_per_node = 0;  ///< cores the node's ranks could use when tuned (informative)
  std::string dtype = "float",
              op = "sum";        ///< what was timed (informative: the choice ignores them)
  std::string tuned_at;          ///< UTC time of the run, ISO 8601
  int reps = 0;                  ///< repetitions behind each median
  int sessions = 1;              ///< --tune runs averaged into the medians (see merge_sessions)
  std::vector<tuning_row> rows;  ///< ascending bytes

  /// True when this table was measured for exactly `shape`'s ranks, nodes
  /// and ranks per node.
  bool matches(const cluster_shape& shape) const;

  /// Every eligible algorithm's expected seconds for `bytes` (see
  /// automatic_candidate), fastest first: the row's medians at a tuned size,
  /// interpolated linearly in log(bytes)-log(time) between the two
  /// neighbouring rows, and the nearest row's medians up to a factor 4
  /// outside the tuned range; empty beyond that (the caller falls back to
  /// the model). `rows_used` receives the tuned size(s) used ("4096" or
  /// "4096..16384").
  /// Whether expected() has an answer for `bytes` (within a factor 4 of
  /// the tuned range).
  bool covers(std::size_t bytes) const;

  std::vector<algo_prediction> expected(std::size_t bytes, const cluster_shape& shape,
                                        std::string* rows_used = nullptr) const;
};

/// `fresh` averaged into `old` when both were measured for the same shape
/// at the same sizes: each algorithm's median becomes the geometric mean over
/// all sessions (old's counted old.sessions times), `best` the lowest again,
/// sessions old.sessions + 1, tuned_at fresh's. A table measured at one
/// moment of a shared machine holds that moment's load; several sessions
/// average it out. Returns `fresh` unchanged when the shapes or sizes differ.
tuning_table merge_sessions(const tuning_table& old, const tuning_table& fresh);

/// A tuning file: the tables of one machine, one per (ranks, layout).
struct tuning_file {
  std::string machine;  ///< host name of rank 0 when tuned
  std::vector<tuning_table> tables;
  std::string origin;  ///< the path it was read from

  /// The table for `shape`, or nullptr.
  const tuning_table* find(const cluster_shape& shape) const;
  /// Replaces the table with t's shape, or adds t (kept sorted by ranks, nodes).
  void put(tuning_table t);

  /// The JSON document (docs/collectives.md, "Tuning").
  std::string to_json() const;
  /// Parses and validates to_json()'s format; throws usage_error naming
  /// `origin`, the line and what is wrong.
  static tuning_file from_json(std::string_view text, std::string_view origin);
};

/// Where the tuning file lives: $RINGFLOW_TUNING, else
/// $XDG_CACHE_HOME/ringflow/tuning-<host>.json, else
/// ~/.cache/ringflow/tuning-<host>.json. RINGFLOW_TUNING=off (or none, 0)
/// disables tables: the empty string is returned.
std::string tuning_path();

/// This machine's host name as a tuning file records it.
std::string tuning_host();

/// The file at `path`: nullopt when it does not exist (or `path` is empty);
/// throws usage_error when it exists but cannot be read or parsed.
std::optional<tuning_file> read_tuning_file(const std::string& path);

/// Writes `f` to `path` (creating the directory, replacing the file
/// atomically); throws usage_error.
void save_tuning_file(const tuning_file& f, const std::string& path);

/// What algo::automatic picks with a table (or nullptr) and the model:
/// the table's measured fastest eligible algorithm when `table` matches
/// `shape` and covers `bytes`, else choose_algorithm(m, shape, bytes).
/// `table_note` says why no table was used (kept in the explanation).
explanation choose_algorithm(const tuning_table* table, std::string_view table_origin,
                             const cost_model& m, const cluster_shape& shape, std::size_t bytes,
                             std::string_view table_note = {});

/// choose_algorithm(table, ...).choice without building the explanation.
algo fastest_algorithm(const tuning_table* table, const cost_model& m, const cluster_shape& shape,
                       std::size_t bytes);

/// Whether algorithm `a` can run on a communicator of `shape` (shm only on
/// one node of the mpi backend with a registered shm allreduce,
/// hierarchical only on several nodes, never automatic or native).
bool automatic_candidate(algo a, const cluster_shape& shape);

}  // namespace ringflow
