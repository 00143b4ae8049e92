// SGD and AdamW updates over flat parameter/gradient spans.
#include "ringflow/ad/optim.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace ringflow::ad {

namespace {
// The store an optimizer was built on must not have changed under it.
template <class S>
void check_store(const parameter_store<S>& params, std::size_t expected, const char* who) {
  params.check_bound();
  if (params.numel() != expected) {
    throw usage_error(fmt::format(
        "ad::{}: the parameter store now holds {} elements but had {} when the optimizer was "
        "built; build the optimizer after the model is complete",
        who, params.numel(), expected));
  }
}

// A parameter with a sparse row gradient (ad::embedding): its slice of the
// store and the rows its backward touched.
template <class S>
struct sparse_part {
  std::size_t offset = 0;
  std::size_t size = 0;
  sparse_rows_grad<S>* grad = nullptr;
};

// The store's sparse parameters, by offset (usually none).
template <class S>
std::vector<sparse_part<S>> sparse_parts(const parameter_store<S>& params) {
  std::vector<sparse_part<S>> out;
  for (const auto& p : params) {
    if (auto* g = p.tensor.sparse_grad()) out.push_back({p.offset, p.size, g});
  }
  std::sort(out.begin(), out.end(),
            [](const auto& a, const auto& b) { return a.offset < b.offset; });
  return out;
}

// Calls fn(i) for every element index of [0, n) outside the sparse parameters.
template <class S, class Fn>
void for_each_dense(std::size_t n, const std::vector<sparse_part<S>>& sparse, Fn&& fn) {
  std::size_t i = 0;
  for (const auto& part : sparse) {
    for (; i < part.offset; ++i) fn(i);
    i = part.offset + part.size;
  }
  for (; i < n; ++i) fn(i);
}

// Calls fn(element index in the store, gradient value) for every element of
// every touched row of every sparse parameter (rows coalesced first, so each
// element is visited once). An index outside the table is a usage_error.
template <class S, class Fn>
void for_each_sparse(const std::vector<sparse_part<S>>& sparse, const char* who, Fn&& fn) {
  for (const auto& part : sparse) {
    auto& g = *part.grad;
    g.coalesce();
    const std::size_t w = g.width;
    const auto rows = static_cast<std::int64_t>(w == 0 ? 0 : part.size / w);
    for (std::size_t k = 0; k < g.indices.size(); ++k) {
      const std::int64_t r = g.indices[k];
      if (r < 0 || r >= rows) {
        throw usage_error(fmt::format(
            "ad::{}: a sparse gradient names row {} of a table of {} rows", who, r, rows));
      }
      const std::size_t base = part.offset + static_cast<std::size_t>(r) * w;
      for (std::size_t j = 0; j < w; ++j) fn(base + j, g.values[k * w + j]);
    }
  }
}
}  // namespace

template <class S>
basic_sgd<S>::basic_sgd(parameter_store<S> params, sgd_options opts)
    : params_(std::move(params)), opts_(opts) {
  if (opts_.lr < 0 || opts_.momentum < 0 || opts_.weight_decay < 0) {
    throw usage_error(fmt::format("ad::sgd: lr {}, momentum {}, weight_decay {} must be >= 0",
                                  opts_.lr, opts_.momentum, opts_.weight_decay));
  }
  if (opts_.nesterov && (opts_.momentum <= 0 || opts_.dampening != 0)) {
    throw usage_error("ad::sgd: nesterov needs momentum > 0 and dampening 0");
  }
  if (opts_.momentum > 0) velocity_.assign(params_.numel(), S(0));
}

template <class S>
void basic_sgd<S>::step() {
  check_store(params_, opts_.momentum > 0 ? velocity_.size() : params_.numel(), "sgd");
  auto p = params_.all_values();
  auto g = params_.all_grads();
  const S lr = static_cast<S>(opts_.lr), wd = static_cast<S>(opts_.weight_decay);
  const S mom = static_cast<S>(opts_.momentum), damp = static_cast<S>(1.0 - opts_.dampening);
  const auto update = [&](std::size_t i, S grad) {
    S d = grad + wd * p[i];
    if (opts_.momentum > 0) {
      S& v = velocity_[i];
      v = t_ > 0 ? mom * v + damp * d : d;
      d = opts_.nesterov ? d + mom * v : v;
    }
    p[i] -= lr * d;
  };
  const auto sparse = sparse_parts(params_);
  for_each_dense(p.size(), sparse, [&](std::size_t i) { update(i, g[i]); });
  // Sparse tables: only the touched rows (lazy; see sgd_options).
  for_each_sparse(sparse, "sgd", update);
  ++t_;
}

template <class S>
basic_adamw<S>::basic_adamw(parameter_store<S> params, adamw_options opts)
    : params_(std::move(params)), opts_(opts) {
  if (opts_.lr < 0 || opts_.weight_decay < 0 || opts_.eps < 0 || opts_.beta1 < 0 ||
      opts_.beta1 >= 1 || opts_.beta2 < 0 || opts_.beta2 >= 1) {
    throw usage_error(fmt::format(
        "ad::adamw: lr {} / weight_decay {} / eps {} must be >= 0 and betas ({}, {}) in [0, 1)",
        opts_.lr, opts_.weight_decay, opts_.eps, opts_.beta1, opts_.beta2));
  }
  m_.assign(params_.numel(), S(0));
  v_.assign(params_.numel(), S(0));
}

template <class S>
void basic_adamw<S>::step() {
  check_store(params_, m_.size(), "adamw");
  ++t_;
  auto p = params_.all_values();
  auto g = params_.all_grads();
  const double c1 = 1.0 - std::pow(opts_.beta1, static_cast<double>(t_));
  const double c2 = 1.0 - std::pow(opts_.beta2, static_cast<double>(t_));
  const S decay = static_cast<S>(1.0 - opts_.lr * opts_.weight_decay);
  const S b1 = static_cast<S>(opts_.beta1), b2 = static_cast<S>(opts_.beta2);
  const S step_size = static_cast<S>(opts_.lr / c1), root_c2 = static_cast<S>(std::sqrt(c2));
  const S eps = static_cast<S>(opts_.eps);
  const auto update = [&](std::size_t i, S grad) {
    p[i] *= decay;
    m_[i] = b1 * m_[i] + (S(1) - b1) * grad;
    v_[i] = b2 * v_[i] + (S(1) - b2) * grad * grad;
    p[i] -= step_size * m_[i] / (std::sqrt(v_[i]) / root_c2 + eps);
  };
  const auto sparse = sparse_parts(params_);
  for_each_dense(p.size(), sparse, [&](std::size_t i) { update(i, g[i]); });
  // Sparse tables: only the touched rows (lazy, like PyTorch's SparseAdam).
  for_each_sparse(sparse, "adamw", update);
}

template <class S>
double clip_grad_norm(const parameter_store<S>& params, double max_norm) {
  if (!(max_norm > 0)) {
    throw usage_error(fmt::format("ad::clip_grad_norm: max_norm {} must be positive", max_norm));
  }
  double sq = 0;
  const auto sparse = sparse_parts(params);
  const auto grads = params.all_grads();
  for_each_dense(grads.size(), sparse, [&](std::size_t i) {
    sq += static_cast<double>(grads[i]) * static_cast<double>(grads[i]);
  });
  for (const auto& part : sparse) {
    part.grad->coalesce();  // a repeated row counts once, summed
    for (S g : part.grad->values) sq += static_cast<double>(g) * static_cast<double>(g);
  }
  const double norm = std::sqrt(sq);
  if (norm > max_norm) {
    const S k = static_cast<S>(max_norm / norm);
    for_each_dense(grads.size(), sparse, [&](std::size_t i) { grads[i] *= k; });
    for (const auto& part : sparse) {
      for (S& g : part.grad->values) g *= k;
    }
  }
  return norm;
}

template double clip_grad_norm<float>(const parameter_store<float>&, double);
template double clip_grad_norm<double>(const parameter_store<double>&, double);
template class basic_sgd<float>;
template class basic_sgd<double>;
template class basic_adamw<float>;
template class basic_adamw<double>;

}  // namespace ringflow::ad
