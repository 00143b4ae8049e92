// Shapes of autodiff tensors: rank 0 (scalar), rank 1 ([n]) or rank 2 ([rows,cols]).
#pragma once

#include <array>
#include <cstdint>
#include <initializer_list>
#include <string>

#include "ringflow/core/error.hpp"

namespace ringflow::ad {

/// Element count and dimension type of autodiff tensors (matches Eigen::Index).
using index = std::ptrdiff_t;

/// Shape of a tensor: `shape{}` is a scalar, `shape{n}` a vector, `shape{r, c}`
/// a matrix (rows are the batch dimension). Storage is always row-major, and a
/// rank-1 `[n]` is laid out (and broadcasts) like one row `[1,n]`.
class shape {
 public:
  shape() = default;
  shape(std::initializer_list<index> dims) {
    if (dims.size() > 2) {
      throw usage_error("ad::shape: " + std::to_string(dims.size()) +
                        " dimensions given; ad tensors have at most 2 (use reshape to fold "
                        "extra dimensions into the batch or feature axis)");
    }
    for (index d : dims) {
      if (d < 0) throw usage_error("ad::shape: negative dimension " + std::to_string(d));
      dims_[static_cast<std::size_t>(rank_++)] = d;
    }
  }

  /// 0, 1 or 2.
  int rank() const { return rank_; }
  /// Rows of the row-major 2-D view: dims[0] for rank 2, else 1.
  index rows() const { return rank_ == 2 ? dims_[0] : 1; }
  /// Columns of the 2-D view: the last dimension, or 1 for a scalar.
  index cols() const { return rank_ == 0 ? 1 : dims_[static_cast<std::size_t>(rank_ - 1)]; }
  index numel() const { return rows() * cols(); }
  /// Dimension i (0 <= i < rank()).
  index operator[](int i) const { return dims_[static_cast<std::size_t>(i)]; }

  /// "[]", "[5]" or "[4,3]": the form every error message uses.
  std::string str() const {
    std::string s = "[";
    for (int i = 0; i < rank_; ++i) {
      if (i) s += ",";
      s += std::to_string(dims_[static_cast<std::size_t>(i)]);
    }
    return s + "]";
  }

  friend bool operator==(const shape& a, const shape& b) {
    return a.rank_ == b.rank_ && a.rows() == b.rows() && a.cols() == b.cols();
  }

 private:
  std::array<index, 2> dims_{0, 0};
  int rank_ = 0;
};

}  // namespace ringflow::ad
