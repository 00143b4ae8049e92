// Layers: the module interface, linear, activation, dropout, sequential and
// an mlp builder. A model's parameters live in one contiguous parameter_store.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "ringflow/ad/init.hpp"
#include "ringflow/ad/ops.hpp"
#include "ringflow/ad/parameter_store.hpp"
#include "ringflow/ad/tensor.hpp"

namespace ringflow::ad {

/// Activation functions a layer or mlp can apply.
enum class activation { none, relu, gelu, tanh, sigmoid };

/// f(x) for the given activation (none: x itself).
template <class S>
basic_tensor<S> apply(activation f, const basic_tensor<S>& x);

template <class S>
using named_parameters = std::vector<std::pair<std::string, basic_tensor<S>>>;

/// A layer or a model: forward(x), named parameters, train/eval mode.
/// Modules are movable, not copyable (a copy would share parameters).
template <class S>
class basic_module {
 public:
  basic_module() = default;
  basic_module(const basic_module&) = delete;
  basic_module& operator=(const basic_module&) = delete;
  basic_module(basic_module&&) noexcept = default;
  basic_module& operator=(basic_module&&) noexcept = default;
  virtual ~basic_module() = default;

  virtual basic_tensor<S> forward(const basic_tensor<S>& x) = 0;
  basic_tensor<S> operator()(const basic_tensor<S>& x) { return forward(x); }

  /// Appends this module's parameters, names prefixed ("0." + "weight").
  virtual void collect_parameters(named_parameters<S>& out, const std::string& prefix) const {
    (void)out;
    (void)prefix;
  }

  /// The model's parameters, packed into one contiguous store (on the first
  /// call, and again if the set of parameters changed, e.g. after add()).
  /// Call it on the outermost model: packing a sub-module's parameters into
  /// the model's store makes the sub-module's own store stale.
  parameter_store<S> parameters();
  /// Zeroes every parameter gradient.
  void zero_grad() { parameters().zero_grad(); }

  /// Training mode (dropout active) or evaluation mode (dropout = identity).
  virtual void train(bool on = true) { training_ = on; }
  void eval() { train(false); }
  bool training() const { return training_; }

 protected:
  bool training_ = true;

 private:
  parameter_store<S> store_;
};

/// y = x W + b with W [in, out] and b [1, out] (row-major, batch in rows).
/// Weights are drawn from a generator seeded with `seed`; the bias is zero.
template <class S>
class basic_linear : public basic_module<S> {
 public:
  basic_linear(index in_features, index out_features, std::uint64_t seed = 0,
               init_kind init = init_kind::kaiming_uniform, bool bias = true);
  basic_tensor<S> forward(const basic_tensor<S>& x) override;
  void collect_parameters(named_parameters<S>& out, const std::string& prefix) const override;

  const basic_tensor<S>& weight() const { return weight_; }
  /// Undefined when built with bias = false.
  const basic_tensor<S>& bias() const { return bias_; }

 private:
  basic_tensor<S> weight_;
  basic_tensor<S> bias_;
};

/// An activation as a layer.
template <class S>
class basic_activation_layer : public basic_module<S> {
 public:
  explicit basic_activation_layer(activation f) : f_(f) {}
  basic_tensor<S> forward(const basic_tensor<S>& x) override { return apply(f_, x); }
  /// The function it applies (serve::model::from_sequential reads it).
  activation function() const { return f_; }

 private:
  activation f_;
};

/// Inverted dropout with its own seeded generator; the identity in eval mode
/// and inside ad::no_grad.
template <class S>
class basic_dropout_layer : public basic_module<S> {
 public:
  explicit basic_dropout_layer(double p, std::uint64_t seed = 0) : p_(p), rng_(seed) {}
  basic_tensor<S> forward(const basic_tensor<S>& x) override {
    return dropout(x, p_, rng_, this->training());
  }

 private:
  double p_;
  generator rng_;
};

/// Runs its layers in order. Parameter names are "<position>.<name>".
/// @code
///   ad::sequential net;
///   net.add(ad::linear(4, 8, /*seed=*/1));
///   net.add(ad::activation_layer(ad::activation::relu));
///   net.add(ad::linear(8, 1, 2));
/// @endcode
template <class S>
class basic_sequential : public basic_module<S> {
 public:
  basic_sequential() = default;

  /// Appends a layer (moved in) and returns a reference to it.
  template <class M>
  requires std::is_base_of_v<basic_module<S>, std::remove_cvref_t<M>> std::remove_cvref_t<M>
  &add(M&& layer) {
    auto p = std::make_unique<std::remove_cvref_t<M>>(std::forward<M>(layer));
    auto& ref = *p;
    layers_.push_back(std::move(p));
    return ref;
  }
  basic_module<S>& add(std::unique_ptr<basic_module<S>> layer);

  std::size_t size() const { return layers_.size(); }
  basic_module<S>& operator[](std::size_t i) { return *layers_.at(i); }

  basic_tensor<S> forward(const basic_tensor<S>& x) override;
  void collect_parameters(named_parameters<S>& out, const std::string& prefix) const override;
  void train(bool on = true) override;

 private:
  std::vector<std::unique_ptr<basic_module<S>>> layers_;
};

/// Options of the mlp builder.
struct mlp_options {
  /// Weight init; by default Kaiming for relu/gelu, Xavier for tanh/sigmoid/none.
  std::optional<init_kind> init = std::nullopt;
  /// Dropout probability after each hidden activation (0: none).
  double dropout = 0.0;
  bool bias = true;
};

/// A multi-layer perceptron: linear layers of the given widths with
/// `hidden` between them (none after the last). Deterministic for a seed.
/// @code
///   ad::mlp model({784, 256, 10}, ad::activation::relu, /*seed=*/42);
///   auto logits = model(x);   // [B, 10]
/// @endcode
template <class S>
class basic_mlp : public basic_sequential<S> {
 public:
  basic_mlp(std::vector<index> sizes, activation hidden = activation::relu, std::uint64_t seed = 0,
            mlp_options opts = {});
};

using module = basic_module<float>;
using linear = basic_linear<float>;
using activation_layer = basic_activation_layer<float>;
using dropout_layer = basic_dropout_layer<float>;
using sequential = basic_sequential<float>;
using mlp = basic_mlp<float>;

extern template class basic_module<float>;
extern template class basic_module<double>;
extern template class basic_linear<float>;
extern template class basic_linear<double>;
extern template class basic_sequential<float>;
extern template class basic_sequential<double>;
extern template class basic_mlp<float>;
extern template class basic_mlp<double>;

}  // namespace ringflow::ad
