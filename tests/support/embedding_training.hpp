// A small click model (embedding table + MLP) trained data-parallel, shared by
// the thread-backend (tests/train) and mpirun (tests/mpi) tests of sparse
// embedding gradients: the same run with sparse or dense reduction.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "ringflow/ad/autodiff.hpp"
#include "ringflow/comm/communicator.hpp"
#include "ringflow/train/data_parallel.hpp"

namespace ringflow::testing {

/// How the ranks' ids overlap in a step.
enum class id_overlap {
  /// Ranks 2j and 2j+1 draw from the rows of block j only: every row is
  /// touched by at most two ranks, so its summed gradient is a + b (or a
  /// alone) whatever the order, and sparse and dense reduction agree bit for bit.
  pairs,
  /// Every rank draws from the whole table: rows summed over 3+ ranks may
  /// round differently in the ring than in sparse_allreduce's rank order.
  all,
};

struct embedding_run {
  std::vector<float> values;     ///< every parameter after the run
  std::vector<float> losses;     ///< this rank's loss per step
  std::uint64_t bytes_sent = 0;  ///< last step's bytes_sent
  std::size_t buckets = 0;       ///< dense buckets
};

inline constexpr std::int64_t embedding_rows = 96;  // 3 blocks of 32 (pairs of ranks, np <= 6)
inline constexpr std::int64_t embedding_fields = 3;
inline constexpr std::int64_t embedding_dim = 4;

/// Trains emb(96 x 4, 3 fields) -> mlp{12, 8, 2} for `steps` SGD steps (lr
/// 0.1), 4 samples per rank and step, with sparse or dense embedding gradients.
/// With `skip_rank` >= 0 that rank runs no forward/backward at step 1.
inline embedding_run train_embedding_model(const communicator& comm, bool sparse, int steps,
                                           id_overlap overlap, int skip_rank = -1,
                                           train::data_parallel_options opts = {}) {
  ad::sequential net;
  net.add(ad::embedding(embedding_rows, embedding_dim, 11, {.sparse = sparse}));
  net.add(ad::mlp({embedding_fields * embedding_dim, 8, 2}, ad::activation::relu, 12));
  train::data_parallel dp(comm, net.parameters(), opts);
  ad::sgd opt(net.parameters(), {.lr = 0.1});
  embedding_run out;
  out.buckets = dp.buckets().size();
  const int r = comm.rank();
  for (int t = 0; t < steps; ++t) {
    std::vector<float> ids;
    std::vector<int> labels;
    std::uint64_t x = static_cast<std::uint64_t>(t * 1000 + r * 17 + 1) * 0x9e3779b97f4a7c15ull;
    for (int b = 0; b < 4; ++b) {
      for (int f = 0; f < embedding_fields; ++f) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        const std::int64_t id = overlap == id_overlap::pairs
                                    ? (r / 2) % 3 * 32 + static_cast<std::int64_t>(x % 32)
                                    : static_cast<std::int64_t>(x % embedding_rows);
        ids.push_back(static_cast<float>(id));
      }
      labels.push_back(static_cast<int>((x >> 20) % 2));
    }
    opt.zero_grad();
    if (!(t == 1 && r == skip_rank)) {
      auto logits = net(ad::tensor::from_vector(ids, {4, embedding_fields}));
      auto loss = ad::softmax_cross_entropy(logits, std::span<const int>(labels));
      out.losses.push_back(loss.item());
      dp.backward(loss);
    }
    dp.step(opt);
    out.bytes_sent = dp.last_step().bytes_sent;
  }
  const auto v = net.parameters().all_values();
  out.values.assign(v.begin(), v.end());
  return out;
}

}  // namespace ringflow::testing
