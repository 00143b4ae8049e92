// custom_op: a node whose forward and backward the caller supplies.
#include "ringflow/ad/custom_op.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <memory>

namespace ringflow::ad {

namespace detail {

template <class S>
basic_tensor<S> make_custom(const char* op, std::string name,
                            const std::vector<basic_tensor<S>>& inputs, shape output_shape,
                            const custom_forward_fn<S>& forward, custom_backward_fn<S> backward,
                            bool zero_output) {
  const std::string shown = name.empty() ? std::string(op) : name;
  if (!forward) throw usage_error(fmt::format("ad::{}: no forward function given", shown));
  std::vector<std::shared_ptr<node<S>>> nodes;
  std::vector<std::span<const S>> values;
  for (std::size_t i = 0; i < inputs.size(); ++i) {
    if (!inputs[i].defined()) {
      throw usage_error(
          fmt::format("ad::{}: input {} is an empty (default-constructed) tensor", shown, i));
    }
    nodes.push_back(inputs[i].node());
    values.emplace_back(inputs[i].node()->value_ptr(), static_cast<std::size_t>(inputs[i].numel()));
  }
  auto out = std::make_shared<node<S>>();
  out->op = op;
  out->name = std::move(name);
  out->dims = output_shape;
  if (zero_output) {
    out->value = allocate<S>(output_shape.numel());
  } else {
    out->value = allocate_uninitialized<S>(output_shape.numel());
  }
  forward(values, std::span<S>(out->value.get(), static_cast<std::size_t>(output_shape.numel())));

  const bool record = grad_enabled() && std::any_of(nodes.begin(), nodes.end(),
                                                    [](const auto& n) { return n->requires_grad; });
  if (record) {
    if (!backward) throw usage_error(fmt::format("ad::{}: no backward function given", shown));
    out->inputs = std::move(nodes);
    out->requires_grad = true;
    out->backward = [fn = std::move(backward)](node<S>& self, std::size_t i) {
      custom_grad_args<S> args;
      args.input = i;
      for (const auto& in : self.inputs) {
        args.inputs.emplace_back(in->value_ptr(), static_cast<std::size_t>(in->dims.numel()));
      }
      const auto n = static_cast<std::size_t>(self.dims.numel());
      args.output = std::span<const S>(self.value.get(), n);
      args.grad_output = std::span<const S>(self.grad_map().data(), n);
      auto& target = *self.inputs[i];
      args.grad_input =
          std::span<S>(target.grad_map().data(), static_cast<std::size_t>(target.dims.numel()));
      fn(args);
    };
  }
  return basic_tensor<S>(std::move(out));
}

}  // namespace detail

template <class S>
basic_tensor<S> custom_op(std::string name, const std::vector<basic_tensor<S>>& inputs,
                          shape output_shape, const custom_forward_fn<S>& forward,
                          custom_backward_fn<S> backward) {
  if (name.empty()) name = "custom_op";
  return detail::make_custom<S>("custom_op", std::move(name), inputs, output_shape, forward,
                                std::move(backward));
}

#define RINGFLOW_AD_CUSTOM(S)                                                                 \
  template basic_tensor<S> custom_op(std::string, const std::vector<basic_tensor<S>>&, shape, \
                                     const custom_forward_fn<S>&, custom_backward_fn<S>);     \
  template basic_tensor<S> detail::make_custom(                                               \
      const char*, std::string, const std::vector<basic_tensor<S>>&, shape,                   \
      const custom_forward_fn<S>&, custom_backward_fn<S>, bool);
RINGFLOW_AD_CUSTOM(float)
RINGFLOW_AD_CUSTOM(double)
#undef RINGFLOW_AD_CUSTOM

}  // namespace ringflow::ad
