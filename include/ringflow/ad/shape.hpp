// Shapes of autodiff tensors: rank 0 (scalar), 1 ([n]), 2 ([rows,cols]), or 3-4
// (images, NCHW) which every op also sees as the 2-D view [dims[0], rest].
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
/// a matrix (rows are the batch dimension), `shape{n, c, h, w}` a batch of
/// images (NCHW). Storage is always row-major, and a rank-1 `[n]` is laid out
/// (and broadcasts) like one row `[1,n]`. Ranks 3 and 4 have the 2-D view
/// [dims[0], product of the rest]: elementwise ops work on them unchanged,
/// matmul and the reductions along a dim need rank <= 2 (reshape first).
class shape {
 public:
  shape() = default;
  shape(std::initializer_list<index> dims) {
    if (dims.size() > max_rank) {
      throw usage_error("ad::shape: " + std::to_string(dims.size()) +
                        " dimensions given; ad tensors have at most 4 (use reshape to fold "
                        "extra dimensions into the batch or feature axis)");
    }
    for (index d : dims) {
      if (d < 0) throw usage_error("ad::shape: negative dimension " + std::to_string(d));
      dims_[static_cast<std::size_t>(rank_++)] = d;
    }
  }

  static constexpr std::size_t max_rank = 4;

  /// 0 to 4.
  int rank() const { return rank_; }
  /// Rows of the row-major 2-D view: dims[0] for rank >= 2, else 1.
  index rows() const { return rank_ >= 2 ? dims_[0] : 1; }
  /// Columns of the 2-D view: the product of the dimensions after the first
  /// (rank >= 2), the only dimension (rank 1), or 1 for a scalar.
  index cols() const {
    if (rank_ == 0) return 1;
    if (rank_ == 1) return dims_[0];
    index c = 1;
    for (int i = 1; i < rank_; ++i) c *= dims_[static_cast<std::size_t>(i)];
    return c;
  }
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
    if (a.rank_ != b.rank_) return false;
    for (int i = 0; i < a.rank_; ++i) {
      if (a.dims_[static_cast<std::size_t>(i)] != b.dims_[static_cast<std::size_t>(i)])
        return false;
    }
    return true;
  }

 private:
  std::array<index, max_rank> dims_{0, 0, 0, 0};
  int rank_ = 0;
};

}  // namespace ringflow::ad
