// Modules: parameter packing, linear, sequential and the mlp builder.
#include "ringflow/ad/layers.hpp"

#include <fmt/format.h>

namespace ringflow::ad {

template <class S>
basic_tensor<S> apply(activation f, const basic_tensor<S>& x) {
  switch (f) {
    case activation::none: return x;
    case activation::relu: return relu(x);
    case activation::gelu: return gelu(x);
    case activation::tanh: return tanh(x);
    case activation::sigmoid: return sigmoid(x);
  }
  throw usage_error("ad::apply: unknown activation value");
}

template <class S>
parameter_store<S> basic_module<S>::parameters() {
  named_parameters<S> now;
  collect_parameters(now, "");
  // Re-pack only when the parameter list changed or someone re-packed it.
  bool same = now.size() == store_.size();
  for (std::size_t i = 0; same && i < now.size(); ++i) {
    same = now[i].second.node() == store_[i].tensor.node() && now[i].first == store_[i].name;
  }
  if (same) {
    try {
      store_.check_bound();
    } catch (const usage_error&) {
      same = false;
    }
  }
  if (!same) {
    store_ = parameter_store<S>();  // old handles (optimizers) see the old store go stale
    store_.pack(now);
  }
  return store_;
}

template <class S>
basic_linear<S>::basic_linear(index in_features, index out_features, std::uint64_t seed,
                              init_kind init, bool bias) {
  if (in_features <= 0 || out_features <= 0) {
    throw usage_error(
        fmt::format("ad::linear: sizes {} -> {} must both be positive", in_features, out_features));
  }
  weight_ = make_parameter<S>("weight", shape{in_features, out_features});
  generator rng(seed);
  initialize(weight_.data(), init, in_features, out_features, rng);
  if (bias) bias_ = make_parameter<S>("bias", shape{1, out_features});
}

template <class S>
basic_tensor<S> basic_linear<S>::forward(const basic_tensor<S>& x) {
  if (x.defined() && x.cols() != weight_.rows()) {
    throw usage_error(fmt::format(
        "ad::linear: input of shape {} does not fit a linear layer with {} inputs (weight {}); "
        "the last dimension must be {}",
        x.shape().str(), weight_.rows(), weight_.shape().str(), weight_.rows()));
  }
  auto y = matmul(x, weight_);
  return bias_.defined() ? add(y, bias_) : y;
}

template <class S>
void basic_linear<S>::collect_parameters(named_parameters<S>& out,
                                         const std::string& prefix) const {
  out.emplace_back(prefix + "weight", weight_);
  if (bias_.defined()) out.emplace_back(prefix + "bias", bias_);
}

template <class S>
basic_module<S>& basic_sequential<S>::add(std::unique_ptr<basic_module<S>> layer) {
  if (!layer) throw usage_error("ad::sequential::add: null layer");
  layers_.push_back(std::move(layer));
  return *layers_.back();
}

template <class S>
basic_tensor<S> basic_sequential<S>::forward(const basic_tensor<S>& x) {
  basic_tensor<S> y = x;
  for (auto& layer : layers_) y = layer->forward(y);
  return y;
}

template <class S>
void basic_sequential<S>::collect_parameters(named_parameters<S>& out,
                                             const std::string& prefix) const {
  for (std::size_t i = 0; i < layers_.size(); ++i) {
    layers_[i]->collect_parameters(out, prefix + std::to_string(i) + ".");
  }
}

template <class S>
void basic_sequential<S>::train(bool on) {
  basic_module<S>::train(on);
  for (auto& layer : layers_) layer->train(on);
}

template <class S>
basic_mlp<S>::basic_mlp(std::vector<index> sizes, activation hidden, std::uint64_t seed,
                        mlp_options opts) {
  if (sizes.size() < 2) {
    throw usage_error(
        fmt::format("ad::mlp: {} size(s) given; pass at least the input and output widths, e.g. "
                    "{{784, 256, 10}}",
                    sizes.size()));
  }
  const init_kind init = opts.init.value_or(hidden == activation::relu || hidden == activation::gelu
                                                ? init_kind::kaiming_uniform
                                                : init_kind::xavier_uniform);
  generator seeds(seed);  // one derived seed per layer: layers do not share draws
  for (std::size_t i = 0; i + 1 < sizes.size(); ++i) {
    this->add(basic_linear<S>(sizes[i], sizes[i + 1], seeds(), init, opts.bias));
    if (i + 2 < sizes.size()) {
      if (hidden != activation::none) this->add(basic_activation_layer<S>(hidden));
      if (opts.dropout > 0.0) this->add(basic_dropout_layer<S>(opts.dropout, seeds()));
    }
  }
}

#define RINGFLOW_AD_LAYERS(S)                                            \
  template basic_tensor<S> apply<S>(activation, const basic_tensor<S>&); \
  template class basic_module<S>;                                        \
  template class basic_linear<S>;                                        \
  template class basic_sequential<S>;                                    \
  template class basic_mlp<S>;
RINGFLOW_AD_LAYERS(float)
RINGFLOW_AD_LAYERS(double)
#undef RINGFLOW_AD_LAYERS

}  // namespace ringflow::ad
