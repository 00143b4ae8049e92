// SGD and AdamW updates over flat parameter/gradient spans.
#include "ringflow/ad/optim.hpp"

#include <fmt/format.h>

#include <cmath>

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
  for (std::size_t i = 0; i < p.size(); ++i) {
    S d = g[i] + wd * p[i];
    if (opts_.momentum > 0) {
      S& v = velocity_[i];
      v = t_ > 0 ? mom * v + damp * d : d;
      d = opts_.nesterov ? d + mom * v : v;
    }
    p[i] -= lr * d;
  }
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
  for (std::size_t i = 0; i < p.size(); ++i) {
    p[i] *= decay;
    m_[i] = b1 * m_[i] + (S(1) - b1) * g[i];
    v_[i] = b2 * v_[i] + (S(1) - b2) * g[i] * g[i];
    p[i] -= step_size * m_[i] / (std::sqrt(v_[i]) / root_c2 + eps);
  }
}

template <class S>
double clip_grad_norm(const parameter_store<S>& params, double max_norm) {
  if (!(max_norm > 0)) {
    throw usage_error(fmt::format("ad::clip_grad_norm: max_norm {} must be positive", max_norm));
  }
  double sq = 0;
  for (S g : params.all_grads()) sq += static_cast<double>(g) * static_cast<double>(g);
  const double norm = std::sqrt(sq);
  if (norm > max_norm) {
    const S k = static_cast<S>(max_norm / norm);
    for (S& g : params.all_grads()) g *= k;
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
