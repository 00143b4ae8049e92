// Custom ops: a public way to add a differentiable op with its own forward
// and backward, without touching the library (conv2d and pooling use it too).
#pragma once

#include <cstddef>
#include <functional>
#include <span>
#include <string>
#include <vector>

#include "ringflow/ad/tensor.hpp"

namespace ringflow::ad {

/// What a custom op's backward gets: the gradient of the output, the values
/// it may need, and the gradient of ONE input to add its contribution into.
template <class S>
struct custom_grad_args {
  /// Which input's gradient is asked for (0-based, in the order given).
  std::size_t input = 0;
  /// Values of every input (row-major, each inputs[i].numel() elements).
  std::vector<std::span<const S>> inputs;
  /// The op's own value (as forward wrote it).
  std::span<const S> output;
  /// dL/d(output), output-shaped.
  std::span<const S> grad_output;
  /// dL/d(inputs[input]): ADD to it (other ops may have contributed already).
  std::span<S> grad_input;
};

/// Writes the op's value (zero-initialized, output_shape.numel() elements)
/// from the input values.
template <class S>
using custom_forward_fn =
    std::function<void(const std::vector<std::span<const S>>& inputs, std::span<S> output)>;
/// Adds dL/d(inputs[args.input]) into args.grad_input. Called only for inputs
/// that require a gradient, once per input per backward. It may capture
/// state saved by forward (e.g. through a shared_ptr), but never a tensor
/// handle of the graph (that would be a reference cycle).
template <class S>
using custom_backward_fn = std::function<void(const custom_grad_args<S>& args)>;

/// A differentiable op defined by its forward and backward. `forward` runs
/// at once; `backward` is recorded (when grad mode is on and some input
/// requires grad) and runs during ad::backward. The result's name() is `name`.
/// @code
///   // y = x^3, dy/dx = 3 x^2
///   auto cube = [](const ad::tensor& x) {
///     return ad::custom_op<float>(
///         "cube", {x}, x.shape(),
///         [](const auto& in, std::span<float> out) {
///           for (std::size_t i = 0; i < out.size(); ++i) out[i] = in[0][i] * in[0][i] * in[0][i];
///         },
///         [](const ad::custom_grad_args<float>& a) {
///           for (std::size_t i = 0; i < a.grad_input.size(); ++i)
///             a.grad_input[i] += a.grad_output[i] * 3 * a.inputs[0][i] * a.inputs[0][i];
///         });
///   };
/// @endcode
template <class S>
basic_tensor<S> custom_op(std::string name, const std::vector<basic_tensor<S>>& inputs,
                          shape output_shape, const custom_forward_fn<S>& forward,
                          custom_backward_fn<S> backward);

namespace detail {
/// custom_op for the library's own ops: `op` is a string literal (node::op);
/// with zero_output false the output starts uninitialized (for a forward
/// that writes every element).
template <class S>
basic_tensor<S> make_custom(const char* op, std::string name,
                            const std::vector<basic_tensor<S>>& inputs, shape output_shape,
                            const custom_forward_fn<S>& forward, custom_backward_fn<S> backward,
                            bool zero_output = true);
}  // namespace detail

}  // namespace ringflow::ad
