// Which ranks share a node: from the hosts' names, or emulated with
// RINGFLOW_NODE_SIZE=k (consecutive blocks of k ranks form one node).
#pragma once

#include <string>
#include <vector>

namespace ringflow {

/// The node layout of a communicator, identical on every rank.
struct topology {
  /// Node index of every rank; nodes are numbered in order of their lowest rank.
  std::vector<int> node_of;
  /// The ranks of every node, ascending.
  std::vector<std::vector<int>> nodes;
  /// True when the layout came from RINGFLOW_NODE_SIZE rather than host names.
  bool emulated = false;

  int ranks() const { return static_cast<int>(node_of.size()); }
  int node_count() const { return static_cast<int>(nodes.size()); }
  /// Ranks on the largest node.
  int max_node_size() const;
  /// "2 nodes x 2 ranks (emulated)", "1 node x 4 ranks", "3 nodes x 1..2 ranks".
  std::string describe() const;

  /// Consecutive blocks of `node_size` ranks (the last block may be smaller).
  static topology blocks(int ranks, int node_size);
  /// Ranks with equal names share a node.
  static topology from_names(const std::vector<std::string>& names);
};

/// RINGFLOW_NODE_SIZE as a positive number, or 0 when unset or empty;
/// throws usage_error for anything else.
int node_size_from_env();

}  // namespace ringflow
