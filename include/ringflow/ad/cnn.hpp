// What a CNN needs: conv2d, max and average pooling, layer norm (ops and
// layers), and the reshape/flatten layers around them. Images are rank-4
// NCHW tensors ([batch, channels, height, width], row-major).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "ringflow/ad/layers.hpp"

namespace ringflow::ad {

/// 2-D convolution (cross-correlation, as in PyTorch): x [N,C,H,W], weight
/// [OC,C,KH,KW], bias [OC] (or an empty tensor for none) -> [N,OC,OH,OW] with
/// OH = (H + 2 padding - KH) / stride + 1 (likewise OW). Zero padding on every
/// side. im2col + one gemm per call; backward: dW and dX by gemm, col2im.
template <class S>
basic_tensor<S> conv2d(const basic_tensor<S>& x, const basic_tensor<S>& weight,
                       const basic_tensor<S>& bias, index stride = 1, index padding = 0);

/// Max over each kernel x kernel window: [N,C,H,W] -> [N,C,OH,OW],
/// OH = (H + 2 padding - kernel) / stride + 1. stride 0 means stride = kernel;
/// padding (<= kernel / 2) never wins the max. The gradient goes to the
/// first maximum of each window.
template <class S>
basic_tensor<S> max_pool2d(const basic_tensor<S>& x, index kernel, index stride = 0,
                           index padding = 0);
/// Mean over each window, shapes as max_pool2d; padded cells count as zeros
/// (the divisor is always kernel * kernel, PyTorch's count_include_pad).
template <class S>
basic_tensor<S> avg_pool2d(const basic_tensor<S>& x, index kernel, index stride = 0,
                           index padding = 0);

/// Layer normalization of each row of the 2-D view ([N,F], or [N,C,H,W]
/// normalized over C*H*W per sample): (x - mean) / sqrt(var + eps) * gamma +
/// beta, with gamma and beta of F elements (empty tensors: no affine part).
/// The same on every rank (no batch statistics), so data-parallel runs agree.
template <class S>
basic_tensor<S> layer_norm(const basic_tensor<S>& x, const basic_tensor<S>& gamma,
                           const basic_tensor<S>& beta, double eps = 1e-5);

/// conv2d as a layer: weight [out,in,k,k] Kaiming-uniform (fan_in in*k*k,
/// like linear) from `seed`, bias zero.
/// @code
///   ad::sequential net;
///   net.add(ad::reshape_layer({1, 28, 28}));          // [B,784] -> [B,1,28,28]
///   net.add(ad::conv2d_layer(1, 16, 3, /*stride=*/1, /*padding=*/1, /*seed=*/1));
///   net.add(ad::activation_layer(ad::activation::relu));
///   net.add(ad::max_pool2d_layer(2));                 // [B,16,14,14]
///   net.add(ad::flatten_layer());                     // [B,3136]
///   net.add(ad::linear(16 * 14 * 14, 10, 2));
/// @endcode
template <class S>
class basic_conv2d_layer : public basic_module<S> {
 public:
  basic_conv2d_layer(index in_channels, index out_channels, index kernel, index stride = 1,
                     index padding = 0, std::uint64_t seed = 0, bool bias = true);
  basic_tensor<S> forward(const basic_tensor<S>& x) override;
  void collect_parameters(named_parameters<S>& out, const std::string& prefix) const override;

  const basic_tensor<S>& weight() const { return weight_; }
  const basic_tensor<S>& bias() const { return bias_; }

 private:
  basic_tensor<S> weight_;
  basic_tensor<S> bias_;
  index stride_;
  index padding_;
};

/// max_pool2d as a layer.
template <class S>
class basic_max_pool2d_layer : public basic_module<S> {
 public:
  explicit basic_max_pool2d_layer(index kernel, index stride = 0, index padding = 0)
      : kernel_(kernel), stride_(stride), padding_(padding) {}
  basic_tensor<S> forward(const basic_tensor<S>& x) override {
    return max_pool2d(x, kernel_, stride_, padding_);
  }

 private:
  index kernel_, stride_, padding_;
};

/// avg_pool2d as a layer.
template <class S>
class basic_avg_pool2d_layer : public basic_module<S> {
 public:
  explicit basic_avg_pool2d_layer(index kernel, index stride = 0, index padding = 0)
      : kernel_(kernel), stride_(stride), padding_(padding) {}
  basic_tensor<S> forward(const basic_tensor<S>& x) override {
    return avg_pool2d(x, kernel_, stride_, padding_);
  }

 private:
  index kernel_, stride_, padding_;
};

/// [N, ...] -> [N, rest]: flatten(x, 1) as a layer.
template <class S>
class basic_flatten_layer : public basic_module<S> {
 public:
  basic_tensor<S> forward(const basic_tensor<S>& x) override { return flatten(x, 1); }
};

/// Keeps the batch dimension and gives each sample the shape `sample`:
/// reshape_layer({1, 28, 28}) turns [B,784] into [B,1,28,28].
template <class S>
class basic_reshape_layer : public basic_module<S> {
 public:
  explicit basic_reshape_layer(std::vector<index> sample);
  basic_tensor<S> forward(const basic_tensor<S>& x) override;

 private:
  std::vector<index> sample_;
};

/// layer_norm as a layer over `features` elements per sample (C*H*W for an
/// image); gamma starts at one, beta at zero.
template <class S>
class basic_layer_norm_layer : public basic_module<S> {
 public:
  explicit basic_layer_norm_layer(index features, double eps = 1e-5, bool affine = true);
  basic_tensor<S> forward(const basic_tensor<S>& x) override;
  void collect_parameters(named_parameters<S>& out, const std::string& prefix) const override;

 private:
  basic_tensor<S> gamma_;
  basic_tensor<S> beta_;
  double eps_;
};

using conv2d_layer = basic_conv2d_layer<float>;
using max_pool2d_layer = basic_max_pool2d_layer<float>;
using avg_pool2d_layer = basic_avg_pool2d_layer<float>;
using flatten_layer = basic_flatten_layer<float>;
using reshape_layer = basic_reshape_layer<float>;
using layer_norm_layer = basic_layer_norm_layer<float>;

extern template class basic_conv2d_layer<float>;
extern template class basic_conv2d_layer<double>;
extern template class basic_reshape_layer<float>;
extern template class basic_reshape_layer<double>;
extern template class basic_layer_norm_layer<float>;
extern template class basic_layer_norm_layer<double>;

}  // namespace ringflow::ad
