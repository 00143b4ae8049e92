// A sparse gradient of a [rows, width] table (an embedding): the touched row
// indices and one gradient row for each, instead of a dense rows x width grad.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <numeric>
#include <vector>

namespace ringflow::ad {

/// Row gradients of a table parameter: indices[k] names the gradient row
/// values[k * width, (k + 1) * width). Rows missing from `indices` have a zero
/// gradient. A backward appends one row per looked-up id (repeats allowed);
/// coalesce() turns that into distinct ascending indices with summed rows.
template <class S>
struct sparse_rows_grad {
  std::vector<std::int64_t> indices;
  std::vector<S> values;
  std::size_t width = 0;
  /// The table's row count (ids are in [0, rows)).
  std::int64_t rows = 0;
  /// The rank this table trains on, for error messages (-1: unknown);
  /// train::data_parallel sets it.
  int rank = -1;
  /// True when indices are distinct and ascending.
  bool coalesced = true;

  bool empty() const { return indices.empty(); }
  /// Drops every row (zero gradient); keeps the capacity.
  void clear() {
    indices.clear();
    values.clear();
    coalesced = true;
  }
  /// Adds `row` (width elements) to the gradient of table row `row_index`.
  void add_row(std::int64_t row_index, const S* row) {
    if (!indices.empty() && indices.back() >= row_index) coalesced = false;
    indices.push_back(row_index);
    values.insert(values.end(), row, row + width);
  }
  /// Sorts the indices ascending and sums the rows of equal indices, in the
  /// order they were added (so the result is the same bits as a dense
  /// scatter-add in that order).
  void coalesce() {
    if (coalesced) return;
    std::vector<std::size_t> order(indices.size());
    std::iota(order.begin(), order.end(), std::size_t{0});
    std::stable_sort(order.begin(), order.end(),
                     [&](std::size_t a, std::size_t b) { return indices[a] < indices[b]; });
    std::vector<std::int64_t> out_indices;
    std::vector<S> out_values;
    out_indices.reserve(indices.size());
    out_values.reserve(values.size());
    for (const std::size_t from : order) {
      const S* row = values.data() + from * width;
      if (out_indices.empty() || out_indices.back() != indices[from]) {
        out_indices.push_back(indices[from]);
        out_values.insert(out_values.end(), row, row + width);
      } else {
        S* acc = out_values.data() + (out_indices.size() - 1) * width;
        for (std::size_t j = 0; j < width; ++j) acc[j] += row[j];
      }
    }
    indices = std::move(out_indices);
    values = std::move(out_values);
    coalesced = true;
  }
};

}  // namespace ringflow::ad
