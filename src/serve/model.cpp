// Inference models: building from an ad model, checking, the fp32 and int8
// forward passes, and post-training quantization with calibration.
#include "ringflow/serve/model.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "ringflow/ad/gemm.hpp"
#include "ringflow/core/error.hpp"

namespace ringflow::serve {

namespace {

constexpr double sqrt_2_over_pi = 0.7978845608028654;

void apply_activation(ad::activation f, float* y, std::size_t n) {
  switch (f) {
    case ad::activation::none: break;
    case ad::activation::relu:
      for (std::size_t i = 0; i < n; ++i) y[i] = y[i] > 0.0f ? y[i] : 0.0f;
      break;
    case ad::activation::gelu:
      for (std::size_t i = 0; i < n; ++i) {
        const double v = y[i];
        y[i] = static_cast<float>(0.5 * v *
                                  (1.0 + std::tanh(sqrt_2_over_pi * (v + 0.044715 * v * v * v))));
      }
      break;
    case ad::activation::tanh:
      for (std::size_t i = 0; i < n; ++i) y[i] = std::tanh(y[i]);
      break;
    case ad::activation::sigmoid:
      for (std::size_t i = 0; i < n; ++i) y[i] = 1.0f / (1.0f + std::exp(-y[i]));
      break;
  }
}

void fp32_layer(const dense_layer& l, const float* x, index batch, float* y) {
  ad::gemm<float>(false, false, batch, l.out, l.in, 1.0f, x, l.in, l.weight.data(), l.out, 0.0f, y,
                  l.out);
  for (index i = 0; i < batch; ++i) {
    float* row = y + i * l.out;
    for (index j = 0; j < l.out; ++j) row[j] += l.bias[static_cast<std::size_t>(j)];
  }
  apply_activation(l.act, y, static_cast<std::size_t>(batch * l.out));
}

struct scratch {
  std::vector<float> ping, pong;
  std::vector<std::uint8_t> q;
  std::vector<std::int32_t> acc;
  std::vector<float> out_scale;
};

scratch& thread_scratch() {
  thread_local scratch s;
  return s;
}

void int8_layer(const dense_layer& l, const packed_int8_matrix& w, const float* x, index batch,
                float* y, scratch& s) {
  const auto n_in = static_cast<std::size_t>(batch * l.in);
  const auto n_out = static_cast<std::size_t>(batch * l.out);
  s.q.resize(n_in);
  s.acc.resize(n_out);
  quantize_u8(x, n_in, 1.0f / l.input.scale, static_cast<float>(l.input.zero_point), s.q.data(),
              w.path());
  gemm_u8s8s32(batch, s.q.data(), l.in, l.input.zero_point, w, s.acc.data(), l.out);
  // Dequantize: y = acc * (input scale * weight scale[j]) + b[j].
  s.out_scale.resize(static_cast<std::size_t>(l.out));
  for (index j = 0; j < l.out; ++j) {
    s.out_scale[static_cast<std::size_t>(j)] =
        l.input.scale * l.weight_scale[static_cast<std::size_t>(j)];
  }
  const float* os = s.out_scale.data();
  const float* b = l.bias.data();
  for (index i = 0; i < batch; ++i) {
    const std::int32_t* a = s.acc.data() + i * l.out;
    float* row = y + i * l.out;
    for (index j = 0; j < l.out; ++j) row[j] = static_cast<float>(a[j]) * os[j] + b[j];
  }
  apply_activation(l.act, y, n_out);
}

[[noreturn]] void bad_layer(std::size_t i, const std::string& what) {
  throw usage_error(fmt::format("serve::model: layer {}: {}", i, what));
}

bool finite_positive(float v) { return std::isfinite(v) && v > 0.0f; }

}  // namespace

std::size_t dense_layer::nonzero_weights() const noexcept {
  if (quantized()) {
    return static_cast<std::size_t>(
        std::count_if(qweight.begin(), qweight.end(), [](std::int8_t v) { return v != 0; }));
  }
  return static_cast<std::size_t>(
      std::count_if(weight.begin(), weight.end(), [](float v) { return v != 0.0f; }));
}

model::model(std::vector<dense_layer> layers, int8_path path)
    : layers_(std::move(layers)), path_(path) {
  for (std::size_t i = 0; i < layers_.size(); ++i) {
    const dense_layer& l = layers_[i];
    const auto size = static_cast<std::size_t>(l.in) * static_cast<std::size_t>(l.out);
    if (l.in < 1 || l.out < 1)
      bad_layer(i, fmt::format("{} x {} is not a layer size", l.in, l.out));
    if (i > 0 && l.in != layers_[i - 1].out) {
      bad_layer(i, fmt::format("takes {} inputs but layer {} gives {} outputs", l.in, i - 1,
                               layers_[i - 1].out));
    }
    if (static_cast<int>(l.act) < 0 ||
        static_cast<int>(l.act) > static_cast<int>(ad::activation::sigmoid)) {
      bad_layer(i, "unknown activation");
    }
    if (l.bias.size() != static_cast<std::size_t>(l.out)) {
      bad_layer(i, fmt::format("has {} biases for {} outputs", l.bias.size(), l.out));
    }
    if (l.quantized()) {
      if (!l.weight.empty()) bad_layer(i, "holds both fp32 and int8 weights");
      if (l.qweight.size() != size) {
        bad_layer(i, fmt::format("has {} int8 weights for {} x {}", l.qweight.size(), l.in, l.out));
      }
      if (l.in > max_int8_depth) {
        bad_layer(i,
                  fmt::format("has {} inputs; int8 layers take at most {}", l.in, max_int8_depth));
      }
      if (l.weight_scale.size() != static_cast<std::size_t>(l.out)) {
        bad_layer(i,
                  fmt::format("has {} weight scales for {} outputs", l.weight_scale.size(), l.out));
      }
      for (const float s : l.weight_scale) {
        if (!finite_positive(s))
          bad_layer(i, fmt::format("weight scale {} is not a positive number", s));
      }
      if (!finite_positive(l.input.scale) || l.input.zero_point < 0 || l.input.zero_point > 255) {
        bad_layer(i, fmt::format("input quantization (scale {}, zero point {}) needs a positive "
                                 "scale and a zero point in [0, 255]",
                                 l.input.scale, l.input.zero_point));
      }
    } else if (l.weight.size() != size) {
      bad_layer(i, fmt::format("has {} weights for {} x {}", l.weight.size(), l.in, l.out));
    }
  }
  packed_.resize(layers_.size());
  for (std::size_t i = 0; i < layers_.size(); ++i) {
    const dense_layer& l = layers_[i];
    if (l.quantized()) packed_[i] = packed_int8_matrix(l.qweight.data(), l.in, l.out, l.out, path);
  }
}

model model::from_sequential(ad::sequential& net) {
  std::vector<dense_layer> layers;
  bool act_done = true;  // no layer yet to attach an activation to
  for (std::size_t i = 0; i < net.size(); ++i) {
    ad::module& m = net[i];
    if (auto* lin = dynamic_cast<ad::linear*>(&m)) {
      dense_layer l;
      l.in = lin->weight().rows();
      l.out = lin->weight().cols();
      const auto w = lin->weight().data();
      l.weight.assign(w.begin(), w.end());
      if (lin->bias().defined()) {
        const auto b = lin->bias().data();
        l.bias.assign(b.begin(), b.end());
      } else {
        l.bias.assign(static_cast<std::size_t>(l.out), 0.0f);
      }
      layers.push_back(std::move(l));
      act_done = false;
    } else if (auto* act = dynamic_cast<ad::activation_layer*>(&m)) {
      if (act_done) {
        throw usage_error(fmt::format(
            "serve::model::from_sequential: layer {} is an activation that follows no linear "
            "layer (or another activation); serve models are linear layers each followed by at "
            "most one activation",
            i));
      }
      layers.back().act = act->function();
      act_done = true;
    } else if (dynamic_cast<ad::dropout_layer*>(&m) == nullptr) {
      throw usage_error(fmt::format(
          "serve::model::from_sequential: layer {} is neither linear, an activation nor dropout; "
          "serve models hold dense layers only",
          i));
    }
  }
  if (layers.empty())
    throw usage_error("serve::model::from_sequential: the model has no linear layer");
  return model(std::move(layers));
}

void model::copy_to(ad::sequential& net) const {
  if (quantized())
    throw usage_error("serve::model::copy_to: the model is quantized; copy an fp32 model");
  std::size_t next = 0;
  for (std::size_t i = 0; i < net.size(); ++i) {
    auto* lin = dynamic_cast<ad::linear*>(&net[i]);
    if (lin == nullptr) continue;
    if (next == layers_.size()) {
      throw usage_error(
          "serve::model::copy_to: the ad model has more linear layers than this model");
    }
    const dense_layer& l = layers_[next];
    if (lin->weight().rows() != l.in || lin->weight().cols() != l.out) {
      throw usage_error(
          fmt::format("serve::model::copy_to: linear layer {} is {} x {}, this "
                      "model's layer {} is {} x {}",
                      i, lin->weight().rows(), lin->weight().cols(), next, l.in, l.out));
    }
    std::copy(l.weight.begin(), l.weight.end(), lin->weight().data().begin());
    if (lin->bias().defined()) std::copy(l.bias.begin(), l.bias.end(), lin->bias().data().begin());
    ++next;
  }
  if (next != layers_.size()) {
    throw usage_error(
        fmt::format("serve::model::copy_to: the ad model has {} linear layers, this "
                    "model {}",
                    next, layers_.size()));
  }
}

std::vector<index> model::widths() const {
  std::vector<index> w;
  if (layers_.empty()) return w;
  w.push_back(layers_.front().in);
  for (const auto& l : layers_) w.push_back(l.out);
  return w;
}

bool model::quantized() const noexcept {
  return std::any_of(layers_.begin(), layers_.end(),
                     [](const dense_layer& l) { return l.quantized(); });
}

std::size_t model::weight_count() const noexcept {
  std::size_t n = 0;
  for (const auto& l : layers_) n += static_cast<std::size_t>(l.in * l.out);
  return n;
}

std::size_t model::nonzero_weights() const noexcept {
  std::size_t n = 0;
  for (const auto& l : layers_) n += l.nonzero_weights();
  return n;
}

void model::forward(const float* x, index batch, float* y) const {
  if (layers_.empty()) throw usage_error("serve::model::forward: the model is empty");
  if (batch < 0) throw usage_error(fmt::format("serve::model::forward: batch {} < 0", batch));
  if (batch == 0) return;
  scratch& s = thread_scratch();
  const float* cur = x;
  for (std::size_t i = 0; i < layers_.size(); ++i) {
    const dense_layer& l = layers_[i];
    float* out = y;
    if (i + 1 < layers_.size()) {
      std::vector<float>& buf = (i % 2 == 0) ? s.ping : s.pong;
      buf.resize(static_cast<std::size_t>(batch * l.out));
      out = buf.data();
    }
    if (l.quantized()) {
      int8_layer(l, packed_[i], cur, batch, out, s);
    } else {
      fp32_layer(l, cur, batch, out);
    }
    cur = out;
  }
}

std::vector<float> model::forward(std::span<const float> x, index batch) const {
  if (batch < 0 || x.size() != static_cast<std::size_t>(batch * inputs())) {
    throw usage_error(fmt::format("serve::model::forward: {} inputs for a batch of {} x {}",
                                  x.size(), batch, inputs()));
  }
  std::vector<float> y(static_cast<std::size_t>(batch * outputs()));
  forward(x.data(), batch, y.data());
  return y;
}

namespace {

activation_quant range_to_quant(float lo, float hi) {
  lo = std::min(lo, 0.0f);
  hi = std::max(hi, 0.0f);
  activation_quant q;
  if (!(hi - lo > 0.0f) || !std::isfinite(hi - lo))
    return q;  // all zero (or garbage): identity-ish
  q.scale = (hi - lo) / 255.0f;
  const double zp = std::nearbyint(-static_cast<double>(lo) / q.scale);
  q.zero_point = static_cast<std::int32_t>(std::clamp(zp, 0.0, 255.0));
  return q;
}

activation_quant calibrate(std::vector<float> v, const calibration_options& o) {
  if (v.empty()) return {};
  if (o.how == calibration_options::method::minmax) {
    const auto [lo, hi] = std::minmax_element(v.begin(), v.end());
    return range_to_quant(*lo, *hi);
  }
  const double p = std::clamp(o.percentile, 50.0, 100.0) / 100.0;
  const auto last = static_cast<double>(v.size() - 1);
  const auto ihi = static_cast<std::size_t>(std::ceil(p * last));
  const auto ilo = static_cast<std::size_t>(std::floor((1.0 - p) * last));
  std::nth_element(v.begin(), v.begin() + static_cast<std::ptrdiff_t>(ihi), v.end());
  const float hi = v[ihi];
  std::nth_element(v.begin(), v.begin() + static_cast<std::ptrdiff_t>(ilo), v.end());
  const float lo = v[ilo];
  return range_to_quant(lo, hi);
}

}  // namespace

model quantize(const model& fp32, const float* calib, index samples,
               const calibration_options& options, int8_path path) {
  if (fp32.empty() || fp32.quantized()) {
    throw usage_error(
        "serve::quantize: needs a non-empty fp32 model (this one is empty or already quantized)");
  }
  if (samples < 1 || calib == nullptr) {
    throw usage_error(
        fmt::format("serve::quantize: {} calibration samples; give at least one", samples));
  }
  std::vector<float> cur(calib, calib + samples * fp32.inputs());
  std::vector<float> next;
  std::vector<dense_layer> out;
  for (const dense_layer& l : fp32.layers()) {
    dense_layer q;
    q.in = l.in;
    q.out = l.out;
    q.act = l.act;
    q.bias = l.bias;
    q.input = calibrate(cur, options);
    q.weight_scale.assign(static_cast<std::size_t>(l.out), 1.0f);
    q.qweight.resize(l.weight.size());
    for (index j = 0; j < l.out; ++j) {
      float amax = 0.0f;
      for (index r = 0; r < l.in; ++r) {
        const float w = l.weight[static_cast<std::size_t>(r * l.out + j)];
        if (!std::isfinite(w)) {
          throw usage_error(
              fmt::format("serve::quantize: weight ({}, {}) of a layer is {}", r, j, w));
        }
        amax = std::max(amax, std::fabs(w));
      }
      const float s = amax > 0.0f ? amax / 127.0f : 1.0f;
      q.weight_scale[static_cast<std::size_t>(j)] = s;
      for (index r = 0; r < l.in; ++r) {
        const auto k = static_cast<std::size_t>(r * l.out + j);
        const float v = std::nearbyint(l.weight[k] / s);
        q.qweight[k] = static_cast<std::int8_t>(std::clamp(v, -127.0f, 127.0f));
      }
    }
    next.resize(static_cast<std::size_t>(samples * l.out));
    fp32_layer(l, cur.data(), samples, next.data());
    cur.swap(next);
    out.push_back(std::move(q));
  }
  return model(std::move(out), path);
}

double accuracy(const model& m, const float* x, std::span<const std::int32_t> labels, index batch) {
  if (labels.empty()) return 0.0;
  batch = std::max<index>(batch, 1);
  const auto n = static_cast<index>(labels.size());
  std::vector<float> y;
  std::size_t right = 0;
  for (index start = 0; start < n; start += batch) {
    const index b = std::min(batch, n - start);
    y.resize(static_cast<std::size_t>(b * m.outputs()));
    m.forward(x + start * m.inputs(), b, y.data());
    for (index i = 0; i < b; ++i) {
      const float* row = y.data() + i * m.outputs();
      const auto best = std::max_element(row, row + m.outputs()) - row;
      if (best == labels[static_cast<std::size_t>(start + i)]) ++right;
    }
  }
  return static_cast<double>(right) / static_cast<double>(labels.size());
}

}  // namespace ringflow::serve
