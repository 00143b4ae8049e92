// Hierarchical two-level allreduce: the ranks of each node reduce-scatter
// among themselves, the ranks holding the same piece on different nodes run
// a ring allreduce on it, and each node allgathers. Only 1/L of the buffer
// (L = ranks per node) crosses the slow inter-node links, in a ring of
// N = nodes ranks instead of N*L.
//
// The buffer is cut into L pieces (L = the largest node's rank count); on a
// node with L' ranks, local rank j owns pieces j, j+L', ... (so nodes of
// unequal size still agree on the pieces and on who meets whom). The
// intra-node phases are direct: every rank sends each piece straight to its
// owner (reduce-scatter) and each owner sends its finished piece straight to
// the others (allgather): one step each, which suits a node's shared memory.
//
// Determinism: a piece is reduced on one owner per node in a fixed order
// (own input, then the other local ranks ascending); the inter-node ring
// gives all owners the same bits; the allgather copies.
#pragma once

#include <cstddef>
#include <cstring>
#include <string_view>
#include <vector>

#include "ringflow/coll/fold.hpp"
#include "ringflow/coll/options.hpp"
#include "ringflow/coll/partition.hpp"
#include "ringflow/coll/ring.hpp"
#include "ringflow/coll/topology.hpp"
#include "ringflow/comm/transport.hpp"
#include "ringflow/core/error.hpp"

namespace ringflow::detail {

inline constexpr int hier_scatter_tag = collective_tag_base + 48;
inline constexpr int hier_gather_tag = collective_tag_base + 49;
/// Added to the ring's tags for the inter-node ring (so they cannot meet
/// any other message between the same two ranks).
inline constexpr int hier_ring_tag_offset = 50;

/// A view of some ranks of a transport as a transport of their own, without
/// a collective split: member i is parent rank members[i]. Cheap to build per
/// call; the caller must be a member.
class subgroup_transport final : public transport {
 public:
  subgroup_transport(transport& parent, std::vector<int> members, int tag_offset)
      : parent_(parent), members_(std::move(members)), tag_offset_(tag_offset) {
    for (std::size_t i = 0; i < members_.size(); ++i) {
      if (members_[i] == parent.rank()) rank_ = static_cast<int>(i);
    }
    set_timeout(parent.timeout());
  }
  int rank() const noexcept override { return rank_; }
  int size() const noexcept override { return static_cast<int>(members_.size()); }
  std::string_view name() const noexcept override { return parent_.name(); }
  request isend(const void* data, std::size_t bytes, int peer, int tag) override {
    return parent_.isend(data, bytes, members_[static_cast<std::size_t>(peer)], tag + tag_offset_);
  }
  request irecv(void* data, std::size_t bytes, int peer, int tag) override {
    return parent_.irecv(data, bytes, members_[static_cast<std::size_t>(peer)], tag + tag_offset_);
  }
  std::shared_ptr<transport> split(int, int) override {
    throw not_supported_error("subgroup_transport cannot be split");
  }
  bool concurrent_use_ok() const noexcept override { return parent_.concurrent_use_ok(); }

 private:
  transport& parent_;
  std::vector<int> members_;
  int tag_offset_;
  int rank_ = -1;
};

/// Hierarchical allreduce of `count` elements from `in` into `out` (may
/// alias) over the nodes of `topo` (which must describe t's ranks).
/// segment_bytes (0: default) is the inter-node ring's segment.
template <class T, class Op>
void hierarchical_allreduce(transport& t, const T* in, T* out, std::size_t count, const Op& op,
                            const topology& topo, std::size_t segment_bytes) {
  const int p = t.size(), r = t.rank();
  if (count == 0) return;
  if (p == 1) return single_rank_result(in, out, count, op);
  const auto& node =
      topo.nodes[static_cast<std::size_t>(topo.node_of[static_cast<std::size_t>(r)])];
  const int L = topo.max_node_size();
  const int here = static_cast<int>(node.size());
  int local = 0;
  while (node[static_cast<std::size_t>(local)] != r) ++local;
  auto owner_on = [&](const std::vector<int>& n, int piece) {
    return n[static_cast<std::size_t>(piece % static_cast<int>(n.size()))];
  };

  // 1. Intra-node reduce-scatter, direct.
  std::vector<int> mine;  // pieces this rank owns
  for (int i = local; i < L; i += here) mine.push_back(i);
  std::size_t owned = 0;
  for (int i : mine) owned += partition(count, L, i).count;
  std::vector<request> sends, recvs;
  if (here > 1) {
    T* stage = scratch<T>(owned * static_cast<std::size_t>(here - 1), 0);
    // stage layout: for each owned piece (in order), here-1 slots, one per
    // other local rank in ascending order.
    std::size_t at = 0;
    for (int i : mine) {
      const chunk c = partition(count, L, i);
      for (int j = 0; j < here; ++j) {
        if (j == local) continue;
        recvs.push_back(t.irecv(stage + at, c.count * sizeof(T), node[static_cast<std::size_t>(j)],
                                hier_scatter_tag));
        at += c.count;
      }
    }
    for (int i = 0; i < L; ++i) {
      const int owner = owner_on(node, i);
      if (owner == r) continue;
      const chunk c = partition(count, L, i);
      sends.push_back(t.isend(in + c.offset, c.count * sizeof(T), owner, hier_scatter_tag));
    }
    wait_all(recvs);
    recvs.clear();
    at = 0;
    for (int i : mine) {
      const chunk c = partition(count, L, i);
      const T* own_in = in + c.offset;
      T* dst = out + c.offset;
      bool first = true;
      for (int j = 0; j < here; ++j) {
        if (j == local) continue;
        combine_to(dst, first ? own_in : static_cast<const T*>(dst),
                   static_cast<const T*>(stage + at), c.count, op);
        first = false;
        at += c.count;
      }
    }
    // The allgather below writes into pieces that were sent from `in`.
    wait_all(sends);
    sends.clear();
  } else if (out != in) {
    std::memcpy(static_cast<void*>(out), in, count * sizeof(T));
  }

  // 2. Inter-node ring allreduce of each owned piece among its owners. avg
  //    sums here and divides by p once below.
  if (topo.node_count() > 1) {
    for (int i : mine) {
      std::vector<int> owners;
      for (const auto& n : topo.nodes) owners.push_back(owner_on(n, i));
      subgroup_transport ring(t, std::move(owners), hier_ring_tag_offset);
      const chunk c = partition(count, L, i);
      if constexpr (Op::kind == op_kind::avg) {
        ring_allreduce(ring, static_cast<const T*>(out + c.offset), out + c.offset, c.count,
                       sum_op{}, segment_bytes ? segment_bytes : default_segment_bytes);
      } else {
        ring_allreduce(ring, static_cast<const T*>(out + c.offset), out + c.offset, c.count, op,
                       segment_bytes ? segment_bytes : default_segment_bytes);
      }
    }
  }
  for (int i : mine) {
    const chunk c = partition(count, L, i);
    finish_range(out + c.offset, c.count, op, p);
  }

  // 3. Intra-node allgather, direct.
  if (here > 1) {
    for (int i = 0; i < L; ++i) {
      const int owner = owner_on(node, i);
      if (owner == r) continue;
      const chunk c = partition(count, L, i);
      recvs.push_back(t.irecv(out + c.offset, c.count * sizeof(T), owner, hier_gather_tag));
    }
    for (int i : mine) {
      const chunk c = partition(count, L, i);
      for (int j = 0; j < here; ++j) {
        if (j == local) continue;
        sends.push_back(t.isend(out + c.offset, c.count * sizeof(T),
                                node[static_cast<std::size_t>(j)], hier_gather_tag));
      }
    }
    wait_all(recvs);
    wait_all(sends);
  }
}

}  // namespace ringflow::detail
