// Differentiable ops on ad tensors: each is a free function that computes its
// value with Eigen and records a backward closure when grad mode is on.
//
// Broadcasting (add, sub, mul, div): two shapes broadcast when each of their
// 2-D dimensions ([n] counts as [1,n], a scalar as [1,1]) is equal or 1, so
// [B,N] op [1,N], [B,N] op [N] and [B,N] op scalar all work. Anything else
// throws ringflow::usage_error naming both shapes, e.g. "[4,3] and [1,5]".
#pragma once

#include <cstdint>
#include <initializer_list>
#include <random>
#include <span>
#include <type_traits>
#include <vector>

#include "ringflow/ad/init.hpp"
#include "ringflow/ad/tensor.hpp"

namespace ringflow::ad {

/// [B,K] x [K,N] -> [B,N]. A rank-1 left operand [K] gives a rank-1 [N].
template <class S>
basic_tensor<S> matmul(const basic_tensor<S>& a, const basic_tensor<S>& b);

/// Elementwise with broadcasting (see the file comment).
template <class S>
basic_tensor<S> add(const basic_tensor<S>& a, const basic_tensor<S>& b);
template <class S>
basic_tensor<S> sub(const basic_tensor<S>& a, const basic_tensor<S>& b);
template <class S>
basic_tensor<S> mul(const basic_tensor<S>& a, const basic_tensor<S>& b);
template <class S>
basic_tensor<S> div(const basic_tensor<S>& a, const basic_tensor<S>& b);
/// x * factor.
template <class S>
basic_tensor<S> scale(const basic_tensor<S>& x, S factor);

/// Sum of all elements: a scalar (rank 0).
template <class S>
basic_tensor<S> sum(const basic_tensor<S>& x);
/// Mean of all elements: a scalar (rank 0).
template <class S>
basic_tensor<S> mean(const basic_tensor<S>& x);
/// Sum along `dim` (0 or 1 for rank 2, 0 for rank 1): [B,N] -> [N] (dim 0)
/// or [B] (dim 1); with keepdim, [1,N] or [B,1] (which broadcast back).
template <class S>
basic_tensor<S> sum(const basic_tensor<S>& x, int dim, bool keepdim = false);
/// Mean along `dim`; shapes as for sum(x, dim, keepdim).
template <class S>
basic_tensor<S> mean(const basic_tensor<S>& x, int dim, bool keepdim = false);

template <class S>
basic_tensor<S> relu(const basic_tensor<S>& x);
/// GELU, tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
template <class S>
basic_tensor<S> gelu(const basic_tensor<S>& x);
template <class S>
basic_tensor<S> tanh(const basic_tensor<S>& x);
template <class S>
basic_tensor<S> sigmoid(const basic_tensor<S>& x);
template <class S>
basic_tensor<S> exp(const basic_tensor<S>& x);
/// Natural log (the caller keeps x > 0).
template <class S>
basic_tensor<S> log(const basic_tensor<S>& x);

/// Row-wise log-softmax, stable (subtracts the row max).
template <class S>
basic_tensor<S> log_softmax(const basic_tensor<S>& x);
/// Row-wise softmax (exp of log_softmax).
template <class S>
basic_tensor<S> softmax(const basic_tensor<S>& x);
/// Fused, stable softmax cross-entropy: logits [B,C], one label in [0,C) per
/// row; the mean over the batch. Gradient (softmax - onehot) / B.
template <class S>
basic_tensor<S> softmax_cross_entropy(const basic_tensor<S>& logits, std::span<const int> labels);
/// Mean squared error: mean((prediction - target)^2); shapes must match.
template <class S>
basic_tensor<S> mse(const basic_tensor<S>& prediction, const basic_tensor<S>& target);

/// Same elements, new shape (numel must match). Shares the value memory.
template <class S>
basic_tensor<S> reshape(const basic_tensor<S>& x, shape s);
/// Rank 1 [numel].
template <class S>
basic_tensor<S> flatten(const basic_tensor<S>& x);
/// Folds the dimensions from `start_dim` on into one: start_dim 0 is
/// flatten(x); start_dim 1 keeps the batch, [N,C,H,W] -> [N,C*H*W] (what a
/// CNN does before its linear layers).
template <class S>
basic_tensor<S> flatten(const basic_tensor<S>& x, int start_dim);
/// Joins along dim 0 (rows) or 1 (columns) of rank-2 tensors, or along the
/// only axis (dim 0) of rank-1 tensors.
template <class S>
basic_tensor<S> concat(const std::vector<basic_tensor<S>>& parts, int dim);
template <class S>
basic_tensor<S> concat(std::initializer_list<basic_tensor<S>> parts, int dim) {
  return concat(std::vector<basic_tensor<S>>(parts), dim);
}
/// Elements [begin, end) along dim 0 or 1 (rank 2) or along the only axis
/// (rank 1, dim 0).
template <class S>
basic_tensor<S> slice(const basic_tensor<S>& x, int dim, index begin, index end);

/// Inverted dropout: zeroes each element with probability p (draws from
/// `rng`) and scales the rest by 1/(1-p). The identity when !training or
/// inside ad::no_grad.
template <class S>
basic_tensor<S> dropout(const basic_tensor<S>& x, double p, generator& rng, bool training = true);

/// Index of the largest element of each row (not differentiable).
template <class S>
std::vector<int> argmax_rows(const basic_tensor<S>& x);

template <class S>
basic_tensor<S> operator+(const basic_tensor<S>& a, const basic_tensor<S>& b) {
  return add(a, b);
}
template <class S>
basic_tensor<S> operator-(const basic_tensor<S>& a, const basic_tensor<S>& b) {
  return sub(a, b);
}
/// Elementwise product (use matmul for the matrix product).
template <class S>
basic_tensor<S> operator*(const basic_tensor<S>& a, const basic_tensor<S>& b) {
  return mul(a, b);
}
template <class S>
basic_tensor<S> operator/(const basic_tensor<S>& a, const basic_tensor<S>& b) {
  return div(a, b);
}
template <class S>
basic_tensor<S> operator*(const basic_tensor<S>& a, std::type_identity_t<S> c) {
  return scale(a, c);
}
template <class S>
basic_tensor<S> operator*(std::type_identity_t<S> c, const basic_tensor<S>& a) {
  return scale(a, c);
}
template <class S>
basic_tensor<S> operator-(const basic_tensor<S>& a) {
  return scale(a, S(-1));
}

}  // namespace ringflow::ad
