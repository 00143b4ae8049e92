// Inference models: a chain of dense layers y = act(x W + b), each with fp32
// or int8 weights, built from a trained ad model and run without the tape.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "ringflow/ad/layers.hpp"
#include "ringflow/serve/int8_gemm.hpp"

namespace ringflow::serve {

/// Affine quantization of a layer's input to uint8: x ~ scale * (q - zero_point).
struct activation_quant {
  float scale = 1.0f;
  std::int32_t zero_point = 0;  ///< in [0, 255]; 0 for non-negative inputs (after relu)
};

/// One layer: y = act(x W + b), W [in, out] row-major (the layout of
/// ad::linear), b [out]. A quantized layer holds int8 weights instead of fp32
/// ones: W[l, j] ~ weight_scale[j] * qweight[l, j] (per output channel,
/// symmetric, in [-127, 127]), and quantizes its input with `input`.
struct dense_layer {
  index in = 0;
  index out = 0;
  ad::activation act = ad::activation::none;
  std::vector<float> weight{};         ///< [in * out]; empty in a quantized layer
  std::vector<float> bias{};           ///< [out]
  std::vector<std::int8_t> qweight{};  ///< [in * out]; empty in an fp32 layer
  std::vector<float> weight_scale{};   ///< [out] (quantized layers)
  activation_quant input{};            ///< (quantized layers)

  bool quantized() const noexcept { return !qweight.empty(); }
  /// Weights that are not zero (fp32 or int8).
  std::size_t nonzero_weights() const noexcept;
};

/// An inference model: dense layers where each one's `out` is the next one's
/// `in`. Immutable once built; forward() is const and may run on many
/// threads at once (each thread keeps its own scratch buffers).
/// @code
///   auto fp32 = serve::model::from_sequential(trained_mlp);
///   auto int8 = serve::quantize(fp32, calib.data(), calib_rows);
///   std::vector<float> logits = int8.forward(x, batch);   // [batch, 10]
/// @endcode
class model {
 public:
  model() = default;
  /// Checks the chain (sizes, vector lengths, scales, zero points; a
  /// usage_error names the layer) and packs the int8 weights for `path`.
  explicit model(std::vector<dense_layer> layers, int8_path path = best_int8_path());

  /// A copy of an ad model made of linear, activation and dropout layers
  /// (dropout is the identity at inference); fp32. A layer of another kind,
  /// or two activations in a row, is a usage_error.
  static model from_sequential(ad::sequential& net);
  /// Writes this fp32 model's weights into `net` (the inverse of
  /// from_sequential: same layer structure and sizes, else usage_error), e.g.
  /// to fine-tune a pruned model.
  void copy_to(ad::sequential& net) const;

  const std::vector<dense_layer>& layers() const noexcept { return layers_; }
  bool empty() const noexcept { return layers_.empty(); }
  index inputs() const noexcept { return layers_.empty() ? 0 : layers_.front().in; }
  index outputs() const noexcept { return layers_.empty() ? 0 : layers_.back().out; }
  /// The widths: inputs, then each layer's outputs ({784, 256, 128, 10}).
  std::vector<index> widths() const;
  /// Whether any layer is quantized.
  bool quantized() const noexcept;
  /// The int8 loops this model runs (where it has int8 layers).
  int8_path path() const noexcept { return path_; }
  std::size_t weight_count() const noexcept;
  std::size_t nonzero_weights() const noexcept;

  /// y [batch, outputs()] = the model on x [batch, inputs()], row-major.
  void forward(const float* x, index batch, float* y) const;
  std::vector<float> forward(std::span<const float> x, index batch) const;

 private:
  std::vector<dense_layer> layers_;
  std::vector<packed_int8_matrix> packed_;  // per layer; empty for fp32 layers
  int8_path path_ = int8_path::baseline;
};

/// How quantize() chooses each layer's input range from the calibration data.
struct calibration_options {
  enum class method {
    minmax,      ///< the smallest and largest value seen
    percentile,  ///< the `percentile` and 100 - `percentile` percentiles (outliers clipped)
  };
  method how = method::minmax;
  double percentile = 99.99;
};

/// Post-training quantization: every layer's weights become per-channel
/// symmetric int8 (scale = max |W[:, j]| / 127), and its input is quantized
/// to uint8 over the range seen on `samples` rows of calibration inputs
/// `calib` [samples, inputs()] (run through the fp32 model; the range always
/// contains 0). Biases and activations stay fp32.
model quantize(const model& fp32, const float* calib, index samples,
               const calibration_options& options = {}, int8_path path = best_int8_path());

/// The rows of `x` [n, features] whose argmax of model(x) equals `labels`,
/// as a fraction (run in batches of `batch`).
double accuracy(const model& m, const float* x, std::span<const std::int32_t> labels,
                index batch = 256);

}  // namespace ringflow::serve
