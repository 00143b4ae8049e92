// The alpha-beta-gamma cost model behind algo::automatic: a predicted time
// for every allreduce algorithm from per-message latency (alpha), per-byte
// transfer time (beta) and per-byte reduction time (gamma), separately for
// links inside a node and between nodes. Formulas: docs/collectives.md.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>
#include <vector>

#include "ringflow/coll/options.hpp"
#include "ringflow/comm/communicator.hpp"
#include "ringflow/core/dtype.hpp"

namespace ringflow {

/// Cost of one point-to-point message of b bytes: alpha + b * beta, where
/// alpha is large_alpha from large_from bytes on (most transports switch from
/// an eager copy to a rendezvous handshake there, which costs a round trip).
struct link_cost {
  double alpha = 0;        ///< seconds per message (small messages)
  double beta = 0;         ///< seconds per byte
  double large_alpha = 0;  ///< seconds per message from large_from bytes on (0: alpha)
  double large_from = 0;   ///< bytes where large_alpha starts (0: never)

  /// Seconds for one message of `bytes`.
  double message(double bytes) const {
    const bool large = large_from > 0 && bytes >= large_from && large_alpha > 0;
    return (large ? large_alpha : alpha) + bytes * beta;
  }
};

/// Machine parameters of the model.
struct cost_model {
  link_cost intra;   ///< between ranks of one node
  link_cost inter;   ///< between nodes
  double gamma = 0;  ///< seconds per byte reduced (float sum, one core)
  /// Extra seconds per step in which every rank of a node must run, for each
  /// rank beyond one per core (the wait for a descheduled peer): charged
  /// only when a node has more ranks than cores (cluster_shape::cores_per_node).
  double oversubscribed_step = 0;
  std::string origin = "built-in";  ///< "built-in" or the file it came from
  std::string machine;              ///< free text: where it was calibrated

  /// The JSON document `ringflow-bench --calibrate` writes (docs/collectives.md).
  std::string to_json() const;
  /// Parses to_json()'s format; throws usage_error naming `origin` and the problem.
  static cost_model from_json(std::string_view text, std::string_view origin);
};

/// Defaults measured on the development machine (docs/collectives.md).
cost_model builtin_cost_model();

/// Where the calibrated model lives: $RINGFLOW_COST_MODEL, else
/// $XDG_CACHE_HOME/ringflow/cost_model.json, else ~/.cache/ringflow/cost_model.json.
std::string cost_model_path();

/// The model at cost_model_path() if that file exists, else the built-in one.
/// A malformed file is logged and ignored (a bad cache must not break training).
cost_model local_cost_model();

/// Writes `m` to `path` (creating the directory); throws ringflow::error.
void save_cost_model(const cost_model& m, const std::string& path);

/// The shape the model needs: how many ranks, on how many nodes.
struct cluster_shape {
  int ranks = 1;
  int nodes = 1;
  int ranks_per_node = 1;  ///< on the largest node
  int cores_per_node = 0;  ///< cores the ranks of the largest node can use (0: unknown)
  bool shm = false;        ///< algo::shm can run (one node, mpi backend, registered)
};

/// Ranks per core on the largest node beyond one (0 when not oversubscribed
/// or the cores are unknown): 1.0 for 4 ranks on 2 cores.
double oversubscription(const cluster_shape& shape);

/// Predicted seconds of one allreduce of `bytes` with algorithm `a`
/// (ring, recursive_doubling, halving_doubling, tree, double_tree,
/// hierarchical, shm); a negative value when the model does not cover `a`
/// there (shm without shape.shm, hierarchical on one node).
double predict_seconds(algo a, const cost_model& m, const cluster_shape& shape, std::size_t bytes,
                       std::size_t segment_bytes = 0);

/// One candidate's prediction.
struct algo_prediction {
  algo algorithm = algo::ring;
  double seconds = 0;
};

/// What algo::automatic picks and why.
struct explanation {
  algo choice = algo::ring;
  double predicted_s = 0;
  algo runner_up = algo::ring;  ///< equals choice when there is a single candidate
  double runner_up_s = 0;
  std::size_t bytes = 0;
  cluster_shape shape;
  std::string model_origin;
  std::vector<algo_prediction> candidates;  ///< fastest first
  /// True when the choice came from a measured tuning table (then the
  /// seconds are measured medians, interpolated between tuned sizes),
  /// false when from the cost model.
  bool from_table = false;
  std::string table_origin;  ///< the tuning file, when from_table
  std::string table_rows;    ///< the tuned size(s) used: "4096" or "4096..16384"
  std::string table_note;    ///< why no table was used, when one was looked for
  /// True when the choice was measured by first-use tuning on this
  /// communicator (then the seconds are the agreed medians: the slowest
  /// rank's median over `first_use_rounds` rounds of the mean of
  /// `first_use_block` consecutive calls).
  bool from_first_use = false;
  int first_use_rounds = 0;
  int first_use_block = 0;
  /// First-use tuning kept the cost model's pick although a runner-up
  /// measured up to 5% faster (detail::first_use_margin: within the noise).
  bool first_use_kept_model = false;
  /// When first-use tuning applies but has not settled this size yet: what
  /// it will do ("measured on the next 54 allreduces of 513 B..1 KiB").
  std::string first_use_note;

  /// "allreduce of 1048576 bytes on 4 ranks (1 node x 4): ring 812.3 us, runner-up ..."
  std::string to_string() const;
};

/// The fastest candidate for (shape, bytes) under `m`: a pure function, so
/// every rank that holds the same model picks the same algorithm.
explanation choose_algorithm(const cost_model& m, const cluster_shape& shape, std::size_t bytes);

/// choose_algorithm(m, shape, bytes).choice without building the explanation
/// (no allocation: this is what every automatic allreduce calls).
algo fastest_algorithm(const cost_model& m, const cluster_shape& shape, std::size_t bytes);

/// Predicted seconds of one alltoall in which every rank sends `bytes` in
/// all (bytes / p to each rank, itself included) with algorithm `a`
/// (pairwise or bruck; -1 for automatic). Formulas: docs/collectives.md.
double predict_alltoall_seconds(alltoall_algo a, const cost_model& m, const cluster_shape& shape,
                                std::size_t bytes);
/// The faster of pairwise and bruck under `m` (pairwise on a tie): a pure
/// function, so every rank holding rank 0's model picks the same.
alltoall_algo choose_alltoall(const cost_model& m, const cluster_shape& shape, std::size_t bytes);

/// Predicted seconds of one reduce of `bytes` to a root with algo::tree
/// (binomial tree) or algo::ring (ring reduce-scatter, then a gather of the
/// pieces); -1 for any other algorithm.
double predict_reduce_seconds(algo a, const cost_model& m, const cluster_shape& shape,
                              std::size_t bytes, std::size_t segment_bytes = 0);
/// The faster of tree and ring under `m` (tree on a tie).
algo choose_reduce(const cost_model& m, const cluster_shape& shape, std::size_t bytes);

}  // namespace ringflow
