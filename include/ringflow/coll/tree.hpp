// Binary-tree and double-binary-tree allreduce: a pipelined reduce up a tree
// to its root, then a pipelined broadcast back down, segment by segment, so
// a segment travels down while later ones still travel up.
//
// The tree is heap-shaped over positions (children of i: 2i+1, 2i+2), depth
// floor(log2 p). A single tree leaves the leaves' send links idle half the
// time and makes interior ranks carry two children's bytes; the double tree
// (NCCL's idea) splits the buffer in two halves and runs the second half on
// the mirrored tree (position i = rank p-1-i), whose interior ranks are the
// first tree's leaves, so both halves progress at once on different ranks.
//
// Determinism: each element is reduced only along its tree, in a fixed order
// (own, first child, second child), finished at the root and broadcast.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstring>
#include <vector>

#include "ringflow/coll/fold.hpp"
#include "ringflow/coll/options.hpp"
#include "ringflow/coll/ring.hpp"
#include "ringflow/comm/transport.hpp"

namespace ringflow::detail {

inline constexpr int tree_up_tag = collective_tag_base + 44;    // + 2 * tree index
inline constexpr int tree_down_tag = collective_tag_base + 45;  // + 2 * tree index

/// One rank's links in a tree over the ranks.
struct tree_links {
  int parent = -1;
  int children[2] = {-1, -1};
  int nchildren = 0;
};

/// Heap-shaped binary tree; `mirrored` maps position i to rank p-1-i.
constexpr tree_links heap_tree(int p, int rank, bool mirrored) {
  const int pos = mirrored ? p - 1 - rank : rank;
  auto rank_at = [&](int q) { return mirrored ? p - 1 - q : q; };
  tree_links l;
  if (pos > 0) l.parent = rank_at((pos - 1) / 2);
  for (int c = 2 * pos + 1; c <= 2 * pos + 2 && c < p; ++c) l.children[l.nchildren++] = rank_at(c);
  return l;
}

/// One tree's share of a tree allreduce: elements [begin, begin + len).
template <class T, class Op>
class tree_pass {
 public:
  tree_pass(transport& t, const T* in, T* out, T* staging, std::size_t staging_stride,
            std::size_t begin, std::size_t len, std::size_t seg, tree_links links, int index,
            const Op& op)
      : t_(t), in_(in), out_(out), begin_(begin), len_(len), seg_(seg), links_(links),
        up_tag_(tree_up_tag + 2 * index), down_tag_(tree_down_tag + 2 * index), op_(op),
        nseg_(len == 0 ? 0 : (len + seg - 1) / seg) {
    // Every child's partials land in its own staging area; posted up front so
    // a child never waits for this rank to be ready.
    for (int c = 0; c < links_.nchildren; ++c) {
      stage_[c] = staging + static_cast<std::size_t>(c) * staging_stride;
      for (std::size_t s = 0; s < nseg_; ++s) {
        child_recvs_[c].push_back(
            t_.irecv(stage_[c] + offset(s), size(s) * sizeof(T), links_.children[c], up_tag_));
      }
    }
  }

  std::size_t segments() const { return nseg_; }

  /// Reduces segment s from this rank and its children and passes it on (to
  /// the parent, or at the root down to the children).
  void up(std::size_t s) {
    const std::size_t o = offset(s), n = size(s);
    if (links_.nchildren == 0) {
      // A leaf forwards its input untouched (the root always has a child).
      up_sends_.push_back(t_.isend(in_ + o, n * sizeof(T), links_.parent, up_tag_));
    } else {
      child_recvs_[0][s].wait();
      combine_to(out_ + o, in_ + o, static_cast<const T*>(stage_[0] + o), n, op_);
      if (links_.nchildren == 2) {
        child_recvs_[1][s].wait();
        combine_to(out_ + o, static_cast<const T*>(out_ + o), static_cast<const T*>(stage_[1] + o),
                   n, op_);
      }
      if (links_.parent < 0) {
        finish_range(out_ + o, n, op_, t_.size());
        send_down(s);
      } else {
        up_sends_.push_back(t_.isend(out_ + o, n * sizeof(T), links_.parent, up_tag_));
      }
    }
    post_ready_down_recvs(false);
  }

  /// Receives the finished segment s from the parent and passes it down.
  void down(std::size_t s) {
    if (links_.parent < 0) return;  // the root sent it while reducing
    while (down_recvs_.size() <= s) post_ready_down_recvs(true);
    down_recvs_[s].wait();
    send_down(s);
  }

  void finish() {
    wait_all(up_sends_);
    wait_all(down_sends_);
  }

 private:
  std::size_t offset(std::size_t s) const { return begin_ + s * seg_; }
  std::size_t size(std::size_t s) const { return std::min(seg_, len_ - s * seg_); }

  void send_down(std::size_t s) {
    for (int c = 0; c < links_.nchildren; ++c) {
      down_sends_.push_back(
          t_.isend(out_ + offset(s), size(s) * sizeof(T), links_.children[c], down_tag_));
    }
  }

  // The result of segment s lands where its partial (or, for an in-place
  // leaf, its input) was sent from: post that receive only once the send is
  // done. `block` waits for the next one instead of testing it.
  void post_ready_down_recvs(bool block) {
    while (down_recvs_.size() < up_sends_.size()) {
      request& sent = up_sends_[down_recvs_.size()];
      if (block) {
        sent.wait();
      } else if (!sent.test()) {
        return;
      }
      const std::size_t s = down_recvs_.size();
      down_recvs_.push_back(
          t_.irecv(out_ + offset(s), size(s) * sizeof(T), links_.parent, down_tag_));
      block = false;
    }
  }

  transport& t_;
  const T* in_;
  T* out_;
  std::size_t begin_, len_, seg_;
  tree_links links_;
  int up_tag_, down_tag_;
  const Op& op_;
  std::size_t nseg_;
  T* stage_[2] = {nullptr, nullptr};
  std::vector<request> child_recvs_[2];
  std::vector<request> up_sends_, down_recvs_, down_sends_;
};

/// Tree allreduce of `count` elements from `in` into `out` (may alias) over
/// one binary tree (trees = 1) or a double binary tree (trees = 2).
/// segment_bytes 0 means default_tree_segment_bytes.
template <class T, class Op>
void tree_allreduce(transport& t, const T* in, T* out, std::size_t count, const Op& op,
                    std::size_t segment_bytes, int trees) {
  const int p = t.size(), r = t.rank();
  if (count == 0) return;
  if (p == 1) return single_rank_result(in, out, count, op);
  const std::size_t seg =
      segment_elems(segment_bytes ? segment_bytes : default_tree_segment_bytes, sizeof(T));
  T* staging = scratch<T>(2 * count, 0);
  std::vector<tree_pass<T, Op>> passes;
  passes.reserve(2);
  if (trees == 1) {
    passes.emplace_back(t, in, out, staging, count, 0, count, seg, heap_tree(p, r, false), 0, op);
  } else {
    const std::size_t half = count / 2;
    passes.emplace_back(t, in, out, staging, count, 0, half, seg, heap_tree(p, r, false), 0, op);
    passes.emplace_back(t, in, out, staging, count, half, count - half, seg, heap_tree(p, r, true),
                        1, op);
  }
  // Segment-major, tree-minor on every rank: a global order in which a rank
  // only ever waits for the same (segment, tree) step of a neighbour.
  std::size_t nseg = 0;
  for (auto& pass : passes) nseg = std::max(nseg, pass.segments());
  for (std::size_t s = 0; s < nseg; ++s) {
    for (auto& pass : passes) {
      if (s < pass.segments()) pass.up(s);
    }
  }
  for (std::size_t s = 0; s < nseg; ++s) {
    for (auto& pass : passes) {
      if (s < pass.segments()) pass.down(s);
    }
  }
  for (auto& pass : passes) pass.finish();
}

}  // namespace ringflow::detail
