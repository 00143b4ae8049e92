// Sparse allreduce for embedding gradients: every rank holds (index, row)
// pairs; every rank receives the sorted distinct indices and, for each, the
// sum of all ranks' rows with that index. Built on allgather and allgatherv.
#pragma once

#include <fmt/format.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <numeric>
#include <span>
#include <string>
#include <vector>

#include "ringflow/coll/collectives.hpp"

namespace ringflow {

/// A sparse set of rows: indices[k] names rows [k * width, (k + 1) * width).
template <class T>
struct sparse_rows {
  std::vector<std::int64_t> indices;
  std::vector<T> values;
  std::size_t width = 0;
  /// How many rows each rank contributed (sparse_allreduce fills it; the
  /// traffic of the reduction follows from it, see sparse_allreduce_bytes_sent).
  std::vector<std::size_t> rank_rows;
};

/// Bytes rank `rank` sends in a sparse_allreduce where rank q contributed
/// rank_rows[q] rows of `width` elements of `elem_bytes`: the ring allgather
/// of the (count, width) pairs, then the ring allgathervs of the int64
/// indices and of the rows, each sending every block but the right
/// neighbour's.
inline std::uint64_t sparse_allreduce_bytes_sent(std::span<const std::size_t> rank_rows,
                                                 std::size_t width, std::size_t elem_bytes,
                                                 int rank) {
  const auto p = rank_rows.size();
  if (p <= 1) return 0;
  const std::size_t right = (static_cast<std::size_t>(rank) + 1) % p;
  std::uint64_t rows = 0;
  for (std::size_t q = 0; q < p; ++q) {
    if (q != right) rows += rank_rows[q];
  }
  const std::uint64_t shapes = (p - 1) * 2 * sizeof(std::int64_t);
  return shapes + rows * (sizeof(std::int64_t) + width * elem_bytes);
}

/// Sparse allreduce (sum): `indices` (any order, repeats allowed) name this
/// rank's rows of `width` elements in `rows` (indices.size() * width
/// elements). Every rank receives the distinct indices of all ranks,
/// ascending, and for each the sum of every rank's rows with that index,
/// added in (rank, position) order: the same bits on every rank and run.
/// Collective: the index counts go round in an allgather, the indices and
/// rows in two allgathervs. width must be the same on every rank.
///
/// @code
/// auto g = ringflow::sparse_allreduce<float>(comm, touched_ids, grad_rows, embedding_dim);
/// for (std::size_t k = 0; k < g.indices.size(); ++k) apply(g.indices[k], &g.values[k * g.width]);
/// @endcode
template <element T>
sparse_rows<T> sparse_allreduce(const communicator& comm, std::span<const std::int64_t> indices,
                                std::span<const std::type_identity_t<T>> rows, std::size_t width) {
  if (rows.size() != indices.size() * width) {
    throw usage_error(fmt::format(
        "sparse_allreduce on rank {}: {} indices of rows of {} elements need {} values, got {}",
        comm.rank(), indices.size(), width, indices.size() * width, rows.size()));
  }
  const int p = comm.size();
  const auto up = static_cast<std::size_t>(p);
  // How many rows each rank has, and the row width: a rank whose width
  // differs is named in the error below, on every rank.
  const std::int64_t mine[2] = {static_cast<std::int64_t>(indices.size()),
                                static_cast<std::int64_t>(width)};
  std::vector<std::int64_t> shapes(2 * up);
  allgather<std::int64_t>(comm, std::span<const std::int64_t>(mine, 2),
                          std::span<std::int64_t>(shapes));
  std::vector<std::size_t> index_counts(up), value_counts(up);
  bool same_width = true;
  for (std::size_t q = 0; q < up; ++q) {
    same_width = same_width && static_cast<std::size_t>(shapes[2 * q + 1]) == width;
    index_counts[q] = static_cast<std::size_t>(shapes[2 * q]);
    value_counts[q] = index_counts[q] * width;
  }
  if (!same_width) {
    // Every rank lists every rank's width: the same facts wherever it is read.
    std::string widths;
    for (std::size_t q = 0; q < up; ++q) {
      widths += fmt::format("{}rank {}: {}", q ? ", " : "", q, shapes[2 * q + 1]);
    }
    throw usage_error(fmt::format(
        "sparse_allreduce on rank {}: the ranks pass rows of different widths ({}); every rank "
        "must pass the same width",
        comm.rank(), widths));
  }
  const std::size_t total =
      std::accumulate(index_counts.begin(), index_counts.end(), std::size_t{0});
  std::vector<std::int64_t> all_indices(total);
  std::vector<T> all_values(total * width);
  allgatherv<std::int64_t>(comm, indices, std::span<std::int64_t>(all_indices), index_counts);
  allgatherv<T>(comm, rows, std::span<T>(all_values), value_counts);

  // Gathered rows in (index, rank, position) order: the position in the
  // gathered buffer is already (rank, position), so a stable sort by index.
  std::vector<std::size_t> order(total);
  std::iota(order.begin(), order.end(), std::size_t{0});
  std::stable_sort(order.begin(), order.end(),
                   [&](std::size_t a, std::size_t b) { return all_indices[a] < all_indices[b]; });
  sparse_rows<T> out;
  out.width = width;
  out.rank_rows = index_counts;
  const sum_op add;
  for (std::size_t k = 0; k < total; ++k) {
    const std::size_t from = order[k];
    const T* row = all_values.data() + from * width;
    if (out.indices.empty() || out.indices.back() != all_indices[from]) {
      out.indices.push_back(all_indices[from]);
      out.values.insert(out.values.end(), row, row + width);
    } else {
      T* acc = out.values.data() + (out.indices.size() - 1) * width;
      for (std::size_t j = 0; j < width; ++j) acc[j] = add(acc[j], row[j]);
    }
  }
  return out;
}

}  // namespace ringflow
