// Broadcast (binomial tree for small messages, pipelined chain for large ones)
// and barrier (dissemination), written against the transport.
#pragma once

#include <algorithm>
#include <cstddef>
#include <vector>

#include "ringflow/coll/ring.hpp"
#include "ringflow/comm/transport.hpp"

namespace ringflow::detail {

inline constexpr int bcast_tag = collective_tag_base + 3;
inline constexpr int barrier_tag = collective_tag_base + 8;  // + round (up to 31)
/// Below this many bytes a binomial tree beats the pipelined chain (fewer
/// steps, and there is nothing to pipeline).
inline constexpr std::size_t bcast_tree_max_bytes = 64 * 1024;

/// Binomial-tree broadcast: log2(p) rounds, each rank receives once.
inline void tree_broadcast(transport& t, void* data, std::size_t bytes, int root) {
  const int p = t.size();
  const int rel = ring_mod(t.rank() - root, p);
  int mask = 1;
  while (mask < p) {  // receive from the parent: clear the lowest set bit
    if (rel & mask) {
      t.irecv(data, bytes, ring_mod(rel - mask + root, p), bcast_tag).wait();
      break;
    }
    mask <<= 1;
  }
  std::vector<request> sends;
  mask >>= 1;
  while (mask > 0) {
    if (rel + mask < p)
      sends.push_back(t.isend(data, bytes, ring_mod(rel + mask + root, p), bcast_tag));
    mask >>= 1;
  }
  wait_all(sends);
}

/// Pipelined chain root -> root+1 -> ...: each segment is forwarded as soon as
/// it arrives, so time ~ (p - 2 + segments) segment transfers.
inline void chain_broadcast(transport& t, char* data, std::size_t bytes, int root,
                            std::size_t seg) {
  const int p = t.size();
  const int rel = ring_mod(t.rank() - root, p);
  const int next = ring_mod(t.rank() + 1, p), prev = ring_mod(t.rank() - 1, p);
  const bool forwards = rel < p - 1;
  std::vector<request> sends;
  if (rel == 0) {
    for (std::size_t o = 0; o < bytes; o += seg) {
      sends.push_back(t.isend(data + o, std::min(seg, bytes - o), next, bcast_tag));
    }
  } else {
    std::vector<request> recvs;
    for (std::size_t o = 0; o < bytes; o += seg) {
      recvs.push_back(t.irecv(data + o, std::min(seg, bytes - o), prev, bcast_tag));
    }
    std::size_t o = 0;
    for (auto& rq : recvs) {
      rq.wait();
      if (forwards) sends.push_back(t.isend(data + o, std::min(seg, bytes - o), next, bcast_tag));
      o += seg;
    }
  }
  wait_all(sends);
}

inline void broadcast_bytes(transport& t, void* data, std::size_t bytes, int root,
                            std::size_t segment_bytes) {
  if (t.size() == 1 || bytes == 0) return;
  if (bytes <= bcast_tree_max_bytes) {
    tree_broadcast(t, data, bytes, root);
  } else {
    chain_broadcast(t, static_cast<char*>(data), bytes, root,
                    std::max<std::size_t>(1, segment_bytes));
  }
}

/// Dissemination barrier: ceil(log2 p) rounds of empty messages.
inline void dissemination_barrier(transport& t) {
  const int p = t.size();
  const int r = t.rank();
  char dummy = 0;
  for (int k = 1, round = 0; k < p; k <<= 1, ++round) {
    auto rq = t.irecv(&dummy, 0, ring_mod(r - k, p), barrier_tag + round);
    t.isend(&dummy, 0, ring_mod(r + k, p), barrier_tag + round).wait();
    rq.wait();
  }
}

}  // namespace ringflow::detail
