// Sparse allreduce for embedding gradients: every rank holds (index, row)
// pairs; every rank receives the sorted distinct indices and, for each, the
// sum of all ranks' rows with that index. Two Bruck gathers (each rank's
// shape, then its indices and rows packed into one block), or, when the
// caller names the table's row count and the rows are dense enough, a dense
// ring allreduce of the table.
#pragma once

#include <fmt/format.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <numeric>
#include <queue>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "ringflow/coll/collectives.hpp"
#include "ringflow/coll/gather_scatter.hpp"
#include "ringflow/coll/partition.hpp"

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
  /// The table's row count the caller named (sparse_allreduce_options); 0: none.
  std::size_t table_rows = 0;
  /// True when sparse_allreduce reduced the table densely (the dense fallback).
  bool dense = false;
};

/// How sparse_allreduce reduces.
enum class sparse_reduction {
  automatic,  ///< dense when sparse_allreduce_prefers_dense, else sparse
  sparse,     ///< always the packed gather of the rows
  dense,      ///< always the dense allreduce of the table (needs table_rows)
};

struct sparse_allreduce_options {
  /// The table's row count: every index must lie in [0, table_rows), and
  /// every rank must pass the same. 0: unknown, which rules out the dense
  /// reduction (and checks no index).
  std::size_t table_rows = 0;
  sparse_reduction reduction = sparse_reduction::automatic;
};

/// int64 words of a rank's packed block in sparse_allreduce: its `rows`
/// indices, then its rows' bytes, padded to a whole word.
constexpr std::size_t sparse_block_words(std::size_t rows, std::size_t width,
                                         std::size_t elem_bytes) {
  return rows + (rows * width * elem_bytes + 7) / 8;
}

/// int64 fields each rank contributes to sparse_allreduce's first gather:
/// its row count, width, table_rows, reduction and out-of-range index count.
inline constexpr std::size_t sparse_shape_fields = 5;

/// Bytes rank `rank` sends in a sparse_allreduce that took the sparse path,
/// where rank q contributed rank_rows[q] rows of `width` elements of
/// `elem_bytes`: the Bruck gather of the shapes (p-1 blocks of 5 int64 from
/// every rank) and the Bruck gather of the packed blocks, in which, in the
/// round of distance d, rank r sends blocks r-n+1 .. r (n = min(d, p-d))
/// of sparse_block_words each.
inline std::uint64_t sparse_allreduce_bytes_sent(std::span<const std::size_t> rank_rows,
                                                 std::size_t width, std::size_t elem_bytes,
                                                 int rank) {
  const int p = static_cast<int>(rank_rows.size());
  if (p <= 1) return 0;
  std::uint64_t words = static_cast<std::uint64_t>(p - 1) * sparse_shape_fields;
  for (int d = 1; d < p; d <<= 1) {
    const int n = std::min(d, p - d);
    for (int j = 0; j < n; ++j) {
      const auto q = static_cast<std::size_t>(detail::ring_mod(rank - j, p));
      words += sparse_block_words(rank_rows[q], width, elem_bytes);
    }
  }
  return words * sizeof(std::int64_t);
}

/// Bytes rank `rank` of `ranks` sends in a sparse_allreduce that took the
/// dense path over a table of `table_rows` rows: the shapes' Bruck gather,
/// then two ring allreduces, of the table (table_rows * width elements of
/// elem_bytes) and of one touched byte per row. A ring allreduce of n
/// elements sends every piece but the rank's own, then every piece but its
/// right neighbour's.
inline std::uint64_t sparse_allreduce_dense_bytes_sent(std::size_t table_rows, std::size_t width,
                                                       std::size_t elem_bytes, int ranks,
                                                       int rank) {
  if (ranks <= 1) return 0;
  auto ring = [&](std::size_t count, std::size_t bytes) -> std::uint64_t {
    if (count == 0) return 0;
    const std::size_t elems = 2 * count - partition(count, ranks, rank).count -
                              partition(count, ranks, (rank + 1) % ranks).count;
    return static_cast<std::uint64_t>(elems) * bytes;
  };
  return static_cast<std::uint64_t>(ranks - 1) * sparse_shape_fields * sizeof(std::int64_t) +
         ring(table_rows * width, elem_bytes) + ring(table_rows, 1);
}

/// Bytes rank `rank` sent in the sparse_allreduce that returned `r`.
template <class T>
std::uint64_t sparse_allreduce_bytes_sent(const sparse_rows<T>& r, int rank) {
  if (r.dense) {
    return sparse_allreduce_dense_bytes_sent(r.table_rows, r.width, sizeof(T),
                                             static_cast<int>(r.rank_rows.size()), rank);
  }
  return sparse_allreduce_bytes_sent(r.rank_rows, r.width, sizeof(T), rank);
}

/// The crossover of sparse_reduction::automatic: true when the sparse path
/// would send more bytes per rank, on average, than the dense one. The
/// sparse path sends every packed block to p-1 ranks, (p-1)/p * 8 * W bytes
/// per rank on average for W words in all blocks; the dense one 2(p-1)/p *
/// table_rows * (width * elem_bytes + 1) (the shapes are the same in both).
/// So: dense when 8 W > 2 table_rows (width elem_bytes + 1), whatever p;
/// for float rows of 16 that is when all ranks together pass more than
/// 2 * 65 / 72 = 1.8 rows per table row. The same on every rank (it reads
/// only the gathered shapes). Never with one rank or table_rows == 0.
inline bool sparse_allreduce_prefers_dense(std::span<const std::size_t> rank_rows,
                                           std::size_t width, std::size_t elem_bytes,
                                           std::size_t table_rows) {
  if (rank_rows.size() <= 1 || table_rows == 0) return false;
  std::uint64_t words = 0;
  for (const std::size_t n : rank_rows) words += sparse_block_words(n, width, elem_bytes);
  return 8 * words > 2 * static_cast<std::uint64_t>(table_rows) * (width * elem_bytes + 1);
}

namespace detail {

/// One Bruck allgatherv of packed int64 blocks as its own collective
/// (fingerprint: allgather with the total, or allgatherv with the total and
/// the counts' hash).
inline void bruck_gather_words(const communicator& comm, coll_kind kind,
                               std::span<const std::int64_t> in, std::span<std::int64_t> out,
                               std::span<const std::size_t> counts) {
  begin_collective(comm, kind, dtype_of<std::int64_t>, op_kind::sum, out.size(),
                   kind == coll_kind::allgatherv ? counts_hash(counts) : -1);
  collective_scope scope(comm);
  note_algorithm(comm, "bruck");
  bruck_allgatherv(comm.raw(), in.data(), out.data(), counts.data());
}

/// The sparse path: every rank's indices and rows, packed into one block
/// per rank, gathered in one Bruck allgatherv; then summed per index in
/// (rank, position) order. Each rank sorts its own rows by index (stably,
/// so repeats keep their order) before packing them, so every gathered
/// block is sorted and the receivers merge p runs instead of sorting all
/// rows: the sort is spread over the ranks, and skipped where the indices
/// are already ascending (data_parallel's coalesced gradients).
template <class T>
void packed_sparse_allreduce(const communicator& comm, std::span<const std::int64_t> indices,
                             std::span<const T> rows, sparse_rows<T>& out) {
  const std::size_t width = out.width, row_bytes = width * sizeof(T);
  const std::size_t up = out.rank_rows.size();
  const auto r = static_cast<std::size_t>(comm.rank());
  std::vector<std::size_t> words(up), at(up + 1, 0);
  for (std::size_t q = 0; q < up; ++q) {
    words[q] = sparse_block_words(out.rank_rows[q], width, sizeof(T));
    at[q + 1] = at[q] + words[q];
  }
  // This rank's block: the indices ascending, then their rows' bytes in
  // the same order (the padding zero).
  const std::size_t n = indices.size();
  std::vector<std::int64_t> mine(words[r], 0);
  auto* mine_rows = reinterpret_cast<unsigned char*>(mine.data() + n);
  if (std::is_sorted(indices.begin(), indices.end())) {
    copy_elems(mine.data(), indices.data(), n);
    if (n != 0 && row_bytes != 0) std::memcpy(mine_rows, rows.data(), n * row_bytes);
  } else {
    std::vector<std::size_t> order(n);
    std::iota(order.begin(), order.end(), std::size_t{0});
    std::stable_sort(order.begin(), order.end(),
                     [&](std::size_t x, std::size_t y) { return indices[x] < indices[y]; });
    for (std::size_t k = 0; k < n; ++k) {
      mine[k] = indices[order[k]];
      if (row_bytes != 0) {
        std::memcpy(mine_rows + k * row_bytes, rows.data() + order[k] * width, row_bytes);
      }
    }
  }
  std::vector<std::int64_t> all(at[up]);
  bruck_gather_words(comm, coll_kind::allgatherv, mine, all, words);

  // Merge the p sorted blocks by (index, rank): with each block in position
  // order among equal indices, that is (index, rank, position). The rows
  // stay in the gathered words and are read with memcpy (they are T's
  // bytes inside int64 words).
  const std::size_t total =
      std::accumulate(out.rank_rows.begin(), out.rank_rows.end(), std::size_t{0});
  out.indices.reserve(total);
  out.values.reserve(total * width);
  std::vector<std::size_t> next(up, 0);
  using head = std::pair<std::int64_t, std::size_t>;  // (index, rank)
  std::priority_queue<head, std::vector<head>, std::greater<head>> heads;
  for (std::size_t q = 0; q < up; ++q) {
    if (out.rank_rows[q] != 0) heads.emplace(all[at[q]], q);
  }
  const sum_op add;
  std::vector<T> row(width);
  while (!heads.empty()) {
    const auto [index, q] = heads.top();
    heads.pop();
    const std::size_t k = next[q]++, nq = out.rank_rows[q];
    const std::int64_t* block = all.data() + at[q];
    if (k + 1 < nq) heads.emplace(block[k + 1], q);
    const auto* from = reinterpret_cast<const unsigned char*>(block + nq) + k * row_bytes;
    if (out.indices.empty() || out.indices.back() != index) {
      out.indices.push_back(index);
      out.values.resize(out.values.size() + width);
      if (row_bytes != 0)
        std::memcpy(out.values.data() + out.values.size() - width, from, row_bytes);
    } else {
      if (row_bytes != 0) std::memcpy(row.data(), from, row_bytes);
      T* acc = out.values.data() + (out.indices.size() - 1) * width;
      for (std::size_t j = 0; j < width; ++j) acc[j] = add(acc[j], row[j]);
    }
  }
}

/// The dense path: this rank's rows scatter-added into a zero table (in
/// position order), a ring allreduce of the table and one of a touched
/// byte per row (max), then the touched rows, ascending.
template <class T>
void dense_sparse_allreduce(const communicator& comm, std::span<const std::int64_t> indices,
                            std::span<const T> rows, sparse_rows<T>& out) {
  const std::size_t width = out.width, n = out.table_rows;
  std::vector<T> table(n * width);
  std::vector<std::uint8_t> touched(n, 0);
  const sum_op add;
  for (std::size_t k = 0; k < indices.size(); ++k) {
    const auto i = static_cast<std::size_t>(indices[k]);
    const T* row = rows.data() + k * width;
    T* acc = table.data() + i * width;
    if (!touched[i]) {
      copy_elems(acc, row, width);
      touched[i] = 1;
    } else {
      for (std::size_t j = 0; j < width; ++j) acc[j] = add(acc[j], row[j]);
    }
  }
  const coll_options ring{algo::ring, 0};
  allreduce<T>(comm, std::span<T>(table), sum, ring);
  allreduce<std::uint8_t>(comm, std::span<std::uint8_t>(touched), max, ring);
  const auto kept = static_cast<std::size_t>(std::count(touched.begin(), touched.end(), 1));
  out.indices.reserve(kept);
  out.values.reserve(kept * width);
  for (std::size_t i = 0; i < n; ++i) {
    if (!touched[i]) continue;
    out.indices.push_back(static_cast<std::int64_t>(i));
    out.values.insert(out.values.end(), table.begin() + static_cast<std::ptrdiff_t>(i * width),
                      table.begin() + static_cast<std::ptrdiff_t>((i + 1) * width));
  }
}

}  // namespace detail

/// Sparse allreduce (sum): `indices` (any order, repeats allowed) name this
/// rank's rows of `width` elements in `rows` (indices.size() * width
/// elements). Every rank receives the distinct indices of all ranks,
/// ascending, and for each the sum of every rank's rows with that index.
/// The same bits on every rank and run.
///
/// Collective: a Bruck gather of each rank's (row count, width, options),
/// then, on the sparse path, one Bruck allgatherv of each rank's indices
/// and rows packed together (2 ceil(log2 p) message rounds), summed in
/// (rank, position) order. With opt.table_rows, the dense path reduces the
/// whole table instead (two ring allreduces) when the sparse one would send
/// more bytes (sparse_allreduce_prefers_dense) or opt.reduction says so; it
/// sums each rank's repeats in position order and the ranks in the ring's
/// order, so its bits can differ from the sparse path's (and a -0.0 sum
/// comes back +0.0). width, table_rows and reduction must be the same on
/// every rank; an index outside [0, table_rows) is an error (on every rank).
///
/// @code
/// auto g = ringflow::sparse_allreduce<float>(comm, touched_ids, grad_rows, embedding_dim,
///                                            {.table_rows = vocabulary});
/// for (std::size_t k = 0; k < g.indices.size(); ++k) apply(g.indices[k], &g.values[k * g.width]);
/// @endcode
template <element T>
sparse_rows<T> sparse_allreduce(const communicator& comm, std::span<const std::int64_t> indices,
                                std::span<const std::type_identity_t<T>> rows, std::size_t width,
                                sparse_allreduce_options opt = {}) {
  if (rows.size() != indices.size() * width) {
    throw usage_error(fmt::format(
        "sparse_allreduce on rank {}: {} indices of rows of {} elements need {} values, got {}",
        comm.rank(), indices.size(), width, indices.size() * width, rows.size()));
  }
  const auto up = static_cast<std::size_t>(comm.size());
  constexpr std::size_t fields = sparse_shape_fields;
  std::int64_t out_of_range = 0;
  if (opt.table_rows > 0) {
    for (const std::int64_t i : indices) {
      out_of_range += i < 0 || static_cast<std::uint64_t>(i) >= opt.table_rows;
    }
  }
  // Every rank's row count, and what must agree (width, table_rows, the
  // reduction, no index outside the table): a rank that differs is named in
  // the errors below, on every rank.
  const std::int64_t mine[fields] = {static_cast<std::int64_t>(indices.size()),
                                     static_cast<std::int64_t>(width),
                                     static_cast<std::int64_t>(opt.table_rows),
                                     static_cast<std::int64_t>(opt.reduction), out_of_range};
  std::vector<std::int64_t> shapes(fields * up);
  const std::vector<std::size_t> shape_counts(up, fields);
  detail::bruck_gather_words(comm, coll_kind::allgather, std::span<const std::int64_t>(mine),
                             std::span<std::int64_t>(shapes), shape_counts);
  auto field = [&](std::size_t q, std::size_t f) { return shapes[fields * q + f]; };
  // Every rank lists every rank's value: the same facts wherever it is read.
  auto list = [&](std::size_t f) {
    std::string s;
    for (std::size_t q = 0; q < up; ++q)
      s += fmt::format("{}rank {}: {}", q ? ", " : "", q, field(q, f));
    return s;
  };
  auto all_same = [&](std::size_t f) {
    for (std::size_t q = 1; q < up; ++q) {
      if (field(q, f) != field(0, f)) return false;
    }
    return true;
  };
  if (!all_same(1)) {
    throw usage_error(fmt::format(
        "sparse_allreduce on rank {}: the ranks pass rows of different widths ({}); every rank "
        "must pass the same width",
        comm.rank(), list(1)));
  }
  if (!all_same(2) || !all_same(3)) {
    throw usage_error(
        fmt::format("sparse_allreduce on rank {}: the ranks pass different options (table_rows {}; "
                    "reduction {}); every rank must pass the same",
                    comm.rank(), list(2), list(3)));
  }
  for (std::size_t q = 0; q < up; ++q) {
    if (field(q, 4) != 0) {
      throw usage_error(fmt::format(
          "sparse_allreduce on rank {}: indices outside the table's {} rows (count per rank: "
          "{}); pass indices in [0, table_rows)",
          comm.rank(), opt.table_rows, list(4)));
    }
  }
  sparse_rows<T> out;
  out.width = width;
  out.table_rows = opt.table_rows;
  out.rank_rows.resize(up);
  for (std::size_t q = 0; q < up; ++q) out.rank_rows[q] = static_cast<std::size_t>(field(q, 0));
  const bool dense =
      opt.reduction == sparse_reduction::dense ||
      (opt.reduction == sparse_reduction::automatic &&
       sparse_allreduce_prefers_dense(out.rank_rows, width, sizeof(T), opt.table_rows));
  if (dense && opt.table_rows == 0) {
    throw usage_error(fmt::format(
        "sparse_allreduce on rank {}: sparse_reduction::dense needs the table's row count; set "
        "sparse_allreduce_options::table_rows",
        comm.rank()));
  }
  out.dense = dense;
  if (dense) {
    detail::dense_sparse_allreduce<T>(comm, indices, rows, out);
  } else {
    detail::packed_sparse_allreduce<T>(comm, indices, rows, out);
  }
  return out;
}

}  // namespace ringflow
