// Optimizers over a parameter_store's flat value/grad buffers: SGD (momentum,
// Nesterov, weight decay) and AdamW (decoupled weight decay).
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "ringflow/ad/parameter_store.hpp"

namespace ringflow::ad {

/// SGD settings (PyTorch semantics). With momentum m and buffer v:
///   g += weight_decay * p;  v = m v + (1 - dampening) g  (v = g on step 1);
///   g = nesterov ? g + m v : v;  p -= lr g.
struct sgd_options {
  double lr = 0.01;
  double momentum = 0.0;
  double dampening = 0.0;
  bool nesterov = false;
  double weight_decay = 0.0;
};

/// Stochastic gradient descent.
///
/// Sparse tables (ad::embedding, weight().sparse_grad() set) are updated
/// lazily: only the rows in the sparse gradient change, with the formula
/// above applied to those rows (weight decay and momentum included); rows
/// no id touched keep their value and velocity. Without momentum and weight
/// decay this is exactly dense SGD (an untouched row's gradient is zero).
/// @code
///   ad::sgd opt(model.parameters(), {.lr = 0.1, .momentum = 0.9, .nesterov = true});
/// @endcode
template <class S>
class basic_sgd {
 public:
  explicit basic_sgd(parameter_store<S> params, sgd_options opts = {});
  /// One update from the current gradients.
  void step();
  /// Zeroes the parameters' gradients.
  void zero_grad() { params_.zero_grad(); }
  double lr() const { return opts_.lr; }
  void set_lr(double lr) { opts_.lr = lr; }
  const sgd_options& options() const { return opts_; }
  const parameter_store<S>& parameters() const { return params_; }

  /// Optimizer state, for checkpoints: the momentum buffer (empty without
  /// momentum; same layout as all_values()) and the step count.
  std::span<S> velocity() { return velocity_; }
  std::int64_t steps() const { return t_; }
  void set_steps(std::int64_t t) { t_ = t; }

 private:
  parameter_store<S> params_;
  sgd_options opts_;
  std::vector<S> velocity_;
  std::int64_t t_ = 0;
};

/// AdamW settings. Per step t (from 1):
///   p -= lr * weight_decay * p;          (decoupled: not added to g)
///   m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;
///   p -= lr * (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps).
struct adamw_options {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 1e-2;
};

/// Adam with decoupled weight decay (Loshchilov & Hutter).
///
/// Sparse tables (ad::embedding) are updated lazily, like PyTorch's
/// SparseAdam: the rows in the sparse gradient get the full update (decay,
/// moments, bias correction with the global step t); untouched rows and
/// their moments stay as they are, where dense AdamW would still decay them
/// and move them by their old moments.
/// @code
///   ad::adamw opt(model.parameters(), {.lr = 1e-3});
///   opt.step();
/// @endcode
template <class S>
class basic_adamw {
 public:
  explicit basic_adamw(parameter_store<S> params, adamw_options opts = {});
  void step();
  void zero_grad() { params_.zero_grad(); }
  double lr() const { return opts_.lr; }
  void set_lr(double lr) { opts_.lr = lr; }
  const adamw_options& options() const { return opts_; }
  const parameter_store<S>& parameters() const { return params_; }

  /// Optimizer state, for checkpoints: first and second moments (same
  /// layout as all_values()) and the step count (bias correction uses it).
  std::span<S> first_moment() { return m_; }
  std::span<S> second_moment() { return v_; }
  std::int64_t steps() const { return t_; }
  void set_steps(std::int64_t t) { t_ = t; }

 private:
  parameter_store<S> params_;
  adamw_options opts_;
  std::vector<S> m_, v_;
  std::int64_t t_ = 0;
};

/// The L2 norm of all gradients (sparse table gradients coalesced and
/// included); if it exceeds max_norm, scales every gradient by max_norm / norm. Returns the norm
/// before clipping.
template <class S>
double clip_grad_norm(const parameter_store<S>& params, double max_norm);

using sgd = basic_sgd<float>;
using adamw = basic_adamw<float>;

extern template class basic_sgd<float>;
extern template class basic_sgd<double>;
extern template class basic_adamw<float>;
extern template class basic_adamw<double>;

}  // namespace ringflow::ad
