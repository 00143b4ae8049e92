// conv2d (im2col + gemm), max/avg pooling and layer norm, built on custom ops;
// and the CNN layers.
#include "ringflow/ad/cnn.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <memory>

#include "ringflow/ad/custom_op.hpp"
#include "ringflow/ad/gemm.hpp"
#include "ringflow/ad/parameter_store.hpp"

namespace ringflow::ad {

namespace {

// Sizes of one 2-D window op over an NCHW input.
struct geometry {
  index n, c, h, w;  // input
  index kh, kw;      // kernel
  index stride, pad;
  index oh, ow;  // output
  index ohw() const { return oh * ow; }
};

geometry window_geometry(const char* op, const shape& x, index kh, index kw, index stride,
                         index pad, const std::string& what) {
  if (x.rank() != 4) {
    throw usage_error(fmt::format(
        "ad::{}: input of shape {} is not an image batch; need rank 4 [N,C,H,W] (reshape a [N,F] "
        "batch with ad::reshape or ad::reshape_layer)",
        op, x.str()));
  }
  if (kh <= 0 || kw <= 0 || stride <= 0 || pad < 0) {
    throw usage_error(fmt::format(
        "ad::{}: kernel {}x{}, stride {}, padding {}: kernel and stride must be positive, padding "
        ">= 0",
        op, kh, kw, stride, pad));
  }
  geometry g{x[0], x[1], x[2], x[3], kh, kw, stride, pad, 0, 0};
  if (g.h + 2 * pad < kh || g.w + 2 * pad < kw) {
    throw usage_error(
        fmt::format("ad::{}: kernel {}x{} ({}) is larger than the padded input {} (padding {})", op,
                    kh, kw, what, x.str(), pad));
  }
  g.oh = (g.h + 2 * pad - kh) / stride + 1;
  g.ow = (g.w + 2 * pad - kw) / stride + 1;
  return g;
}

// cols [C*KH*KW, N*OH*OW]: row (c,ki,kj), column (b,oh,ow) = x[b,c,oh*s-p+ki,ow*s-p+kj] or 0.
template <class S>
void im2col(const geometry& g, const S* x, S* cols) {
  const index p = g.n * g.ohw();
  for (index c = 0; c < g.c; ++c) {
    for (index ki = 0; ki < g.kh; ++ki) {
      for (index kj = 0; kj < g.kw; ++kj) {
        S* row = cols + ((c * g.kh + ki) * g.kw + kj) * p;
        // Output columns whose input column is inside the image: [ow_lo, ow_hi).
        index ow_lo = 0, ow_hi = g.ow;
        while (ow_lo < g.ow && ow_lo * g.stride - g.pad + kj < 0) ++ow_lo;
        while (ow_hi > ow_lo && (ow_hi - 1) * g.stride - g.pad + kj >= g.w) --ow_hi;
        for (index b = 0; b < g.n; ++b) {
          const S* plane = x + (b * g.c + c) * g.h * g.w;
          for (index oh = 0; oh < g.oh; ++oh) {
            S* out = row + (b * g.oh + oh) * g.ow;
            const index ih = oh * g.stride - g.pad + ki;
            if (ih < 0 || ih >= g.h) {
              std::fill(out, out + g.ow, S(0));
              continue;
            }
            const index base = ih * g.w - g.pad + kj;  // input offset of ow = 0
            std::fill(out, out + ow_lo, S(0));
            if (g.stride == 1) {
              std::copy(plane + base + ow_lo, plane + base + ow_hi, out + ow_lo);
            } else {
              for (index ow = ow_lo; ow < ow_hi; ++ow) out[ow] = plane[base + ow * g.stride];
            }
            std::fill(out + ow_hi, out + g.ow, S(0));
          }
        }
      }
    }
  }
}

// The adjoint of im2col: dx[b,c,ih,iw] += every column entry that read it.
template <class S>
void col2im_add(const geometry& g, const S* cols, S* dx) {
  const index p = g.n * g.ohw();
  for (index c = 0; c < g.c; ++c) {
    for (index ki = 0; ki < g.kh; ++ki) {
      for (index kj = 0; kj < g.kw; ++kj) {
        const S* row = cols + ((c * g.kh + ki) * g.kw + kj) * p;
        index ow_lo = 0, ow_hi = g.ow;
        while (ow_lo < g.ow && ow_lo * g.stride - g.pad + kj < 0) ++ow_lo;
        while (ow_hi > ow_lo && (ow_hi - 1) * g.stride - g.pad + kj >= g.w) --ow_hi;
        for (index b = 0; b < g.n; ++b) {
          S* plane = dx + (b * g.c + c) * g.h * g.w;
          for (index oh = 0; oh < g.oh; ++oh) {
            const index ih = oh * g.stride - g.pad + ki;
            if (ih < 0 || ih >= g.h) continue;
            const S* in = row + (b * g.oh + oh) * g.ow;
            const index base = ih * g.w - g.pad + kj;
            for (index ow = ow_lo; ow < ow_hi; ++ow) plane[base + ow * g.stride] += in[ow];
          }
        }
      }
    }
  }
}

// [N, OC, OHW] -> [OC, N*OHW] (the gemm layout of the output gradient).
template <class S>
void to_channel_major(const S* nchw, index n, index oc, index hw, S* out) {
  for (index b = 0; b < n; ++b) {
    for (index o = 0; o < oc; ++o) {
      const S* src = nchw + (b * oc + o) * hw;
      std::copy(src, src + hw, out + (o * n + b) * hw);
    }
  }
}

// A per-thread buffer of at least n elements, reused across calls (its old
// contents are garbage): the temporaries of conv2d would otherwise cost a
// fresh, zeroed and page-faulted allocation of megabytes per call.
template <class S>
S* scratch(int slot, std::size_t n) {
  thread_local std::array<std::vector<S>, 3> buffers;
  auto& b = buffers[static_cast<std::size_t>(slot)];
  if (b.size() < n) b.resize(n);
  return b.data();
}

}  // namespace

template <class S>
basic_tensor<S> conv2d(const basic_tensor<S>& x, const basic_tensor<S>& weight,
                       const basic_tensor<S>& bias, index stride, index padding) {
  if (!x.defined() || !weight.defined()) {
    throw usage_error("ad::conv2d: empty (default-constructed) input or weight tensor");
  }
  const shape& ws = weight.shape();
  if (ws.rank() != 4) {
    throw usage_error(
        fmt::format("ad::conv2d: weight of shape {} is not [OC,C,KH,KW] (rank 4); input {}",
                    ws.str(), x.shape().str()));
  }
  const geometry g =
      window_geometry("conv2d", x.shape(), ws[2], ws[3], stride, padding, "weight " + ws.str());
  const index oc = ws[0];
  if (ws[1] != g.c) {
    throw usage_error(fmt::format(
        "ad::conv2d: input {} has {} channels but weight {} expects {} (weight is [OC,C,KH,KW])",
        x.shape().str(), g.c, ws.str(), ws[1]));
  }
  const bool has_bias = bias.defined();
  if (has_bias && bias.numel() != oc) {
    throw usage_error(fmt::format("ad::conv2d: bias of shape {} does not match {} output channels",
                                  bias.shape().str(), oc));
  }
  const index k = g.c * g.kh * g.kw;
  const index p = g.n * g.ohw();
  const index hw = g.ohw();
  // The columns are kept for the backward (dW needs them).
  // im2col writes every element: no zero-fill needed.
  std::shared_ptr<S> cols = detail::allocate_uninitialized<S>(k * p);
  std::vector<basic_tensor<S>> inputs{x, weight};
  if (has_bias) inputs.push_back(bias);

  auto forward = [&](const std::vector<std::span<const S>>& in, std::span<S> out) {
    im2col(g, in[0].data(), cols.get());
    S* tmp = scratch<S>(0, static_cast<std::size_t>(oc * p));
    // [OC, K] x [K, P] -> [OC, P]
    gemm<S>(false, false, oc, p, k, S(1), in[1].data(), k, cols.get(), p, S(0), tmp, p);
    for (index b = 0; b < g.n; ++b) {
      for (index o = 0; o < oc; ++o) {
        const S* src = tmp + (o * g.n + b) * hw;
        S* dst = out.data() + (b * oc + o) * hw;
        const S add = has_bias ? in[2][static_cast<std::size_t>(o)] : S(0);
        for (index i = 0; i < hw; ++i) dst[i] = src[i] + add;
      }
    }
  };
  auto backward = [g, oc, k, p, hw, cols](const custom_grad_args<S>& a) {
    const S* gy = a.grad_output.data();
    if (a.input == 2) {  // db[o] += sum over batch and pixels
      for (index b = 0; b < g.n; ++b) {
        for (index o = 0; o < oc; ++o) {
          const S* src = gy + (b * oc + o) * hw;
          S s = 0;
          for (index i = 0; i < hw; ++i) s += src[i];
          a.grad_input[static_cast<std::size_t>(o)] += s;
        }
      }
      return;
    }
    S* gt = scratch<S>(1, static_cast<std::size_t>(oc * p));
    to_channel_major(gy, g.n, oc, hw, gt);
    if (a.input == 1) {  // dW [OC,K] += gt [OC,P] x cols^T [P,K]
      gemm<S>(false, true, oc, k, p, S(1), gt, p, cols.get(), p, S(1), a.grad_input.data(), k);
    } else {  // dcols [K,P] = W^T [K,OC] x gt [OC,P]; dx += col2im(dcols)
      S* dcols = scratch<S>(2, static_cast<std::size_t>(k * p));
      gemm<S>(true, false, k, p, oc, S(1), a.inputs[1].data(), k, gt, p, S(0), dcols, p);
      col2im_add(g, dcols, a.grad_input.data());
    }
  };
  return detail::make_custom<S>("conv2d", "", inputs, shape{g.n, oc, g.oh, g.ow}, forward,
                                std::move(backward), /*zero_output=*/false);
}

namespace {
index pool_stride(index kernel, index stride) { return stride == 0 ? kernel : stride; }
}  // namespace

template <class S>
basic_tensor<S> max_pool2d(const basic_tensor<S>& x, index kernel, index stride, index padding) {
  if (!x.defined()) throw usage_error("ad::max_pool2d: empty (default-constructed) tensor passed");
  const index s = pool_stride(kernel, stride);
  const geometry g = window_geometry("max_pool2d", x.shape(), kernel, kernel, s, padding,
                                     fmt::format("window {}", kernel));
  if (padding > kernel / 2) {
    throw usage_error(fmt::format(
        "ad::max_pool2d: padding {} is more than half the kernel {}; a window could hold only "
        "padding",
        padding, kernel));
  }
  const index planes = g.n * g.c;
  const index out_n = planes * g.ohw();
  auto argmax = std::make_shared<std::vector<std::int32_t>>(static_cast<std::size_t>(out_n));
  auto forward = [&](const std::vector<std::span<const S>>& in, std::span<S> out) {
    for (index pl = 0; pl < planes; ++pl) {
      const S* plane = in[0].data() + pl * g.h * g.w;
      for (index oh = 0; oh < g.oh; ++oh) {
        const index h0 = std::max<index>(oh * s - padding, 0);
        const index h1 = std::min<index>(oh * s - padding + kernel, g.h);
        for (index ow = 0; ow < g.ow; ++ow) {
          const index w0 = std::max<index>(ow * s - padding, 0);
          const index w1 = std::min<index>(ow * s - padding + kernel, g.w);
          S best = -std::numeric_limits<S>::infinity();
          index at = h0 * g.w + w0;
          for (index ih = h0; ih < h1; ++ih) {
            for (index iw = w0; iw < w1; ++iw) {
              const S v = plane[ih * g.w + iw];
              if (v > best) {
                best = v;
                at = ih * g.w + iw;
              }
            }
          }
          const index o = (pl * g.oh + oh) * g.ow + ow;
          out[static_cast<std::size_t>(o)] = best;
          (*argmax)[static_cast<std::size_t>(o)] = static_cast<std::int32_t>(pl * g.h * g.w + at);
        }
      }
    }
  };
  auto backward = [argmax](const custom_grad_args<S>& a) {
    for (std::size_t o = 0; o < argmax->size(); ++o) {
      a.grad_input[static_cast<std::size_t>((*argmax)[o])] += a.grad_output[o];
    }
  };
  return detail::make_custom<S>("max_pool2d", "", {x}, shape{g.n, g.c, g.oh, g.ow}, forward,
                                std::move(backward), /*zero_output=*/false);
}

template <class S>
basic_tensor<S> avg_pool2d(const basic_tensor<S>& x, index kernel, index stride, index padding) {
  if (!x.defined()) throw usage_error("ad::avg_pool2d: empty (default-constructed) tensor passed");
  const index s = pool_stride(kernel, stride);
  const geometry g = window_geometry("avg_pool2d", x.shape(), kernel, kernel, s, padding,
                                     fmt::format("window {}", kernel));
  const index planes = g.n * g.c;
  const S inv = S(1) / static_cast<S>(kernel * kernel);
  // Calls fn(input offset, output offset) for every (window cell, output) pair.
  auto each = [g, planes, s, kernel, padding](auto&& fn) {
    for (index pl = 0; pl < planes; ++pl) {
      for (index oh = 0; oh < g.oh; ++oh) {
        const index h0 = std::max<index>(oh * s - padding, 0);
        const index h1 = std::min<index>(oh * s - padding + kernel, g.h);
        for (index ow = 0; ow < g.ow; ++ow) {
          const index w0 = std::max<index>(ow * s - padding, 0);
          const index w1 = std::min<index>(ow * s - padding + kernel, g.w);
          const index o = (pl * g.oh + oh) * g.ow + ow;
          for (index ih = h0; ih < h1; ++ih) {
            for (index iw = w0; iw < w1; ++iw) fn((pl * g.h + ih) * g.w + iw, o);
          }
        }
      }
    }
  };
  auto forward = [&](const std::vector<std::span<const S>>& in, std::span<S> out) {
    const S* xv = in[0].data();
    each([&](index i, index o) { out[static_cast<std::size_t>(o)] += xv[i] * inv; });
  };
  auto backward = [each, inv](const custom_grad_args<S>& a) {
    each([&](index i, index o) {
      a.grad_input[static_cast<std::size_t>(i)] += a.grad_output[static_cast<std::size_t>(o)] * inv;
    });
  };
  return detail::make_custom<S>("avg_pool2d", "", {x}, shape{g.n, g.c, g.oh, g.ow}, forward,
                                std::move(backward));
}

template <class S>
basic_tensor<S> layer_norm(const basic_tensor<S>& x, const basic_tensor<S>& gamma,
                           const basic_tensor<S>& beta, double eps) {
  if (!x.defined()) throw usage_error("ad::layer_norm: empty (default-constructed) tensor passed");
  const index rows = x.rows(), f = x.cols();
  const bool affine = gamma.defined() || beta.defined();
  if (affine && (!gamma.defined() || !beta.defined() || gamma.numel() != f || beta.numel() != f)) {
    throw usage_error(fmt::format(
        "ad::layer_norm: gamma {} and beta {} must both have {} elements, one per feature of the "
        "input {} (or both be empty for no affine part)",
        gamma.defined() ? gamma.shape().str() : "(empty)",
        beta.defined() ? beta.shape().str() : "(empty)", f, x.shape().str()));
  }
  if (f == 0) throw usage_error("ad::layer_norm: input " + x.shape().str() + " has no features");
  // Per-row mean and 1/std, kept for the backward.
  auto stats = std::make_shared<std::vector<S>>(static_cast<std::size_t>(2 * rows));
  std::vector<basic_tensor<S>> inputs{x};
  if (affine) {
    inputs.push_back(gamma);
    inputs.push_back(beta);
  }
  auto forward = [&](const std::vector<std::span<const S>>& in, std::span<S> out) {
    for (index r = 0; r < rows; ++r) {
      const S* xr = in[0].data() + r * f;
      S mu = 0;
      for (index j = 0; j < f; ++j) mu += xr[j];
      mu /= static_cast<S>(f);
      S var = 0;
      for (index j = 0; j < f; ++j) var += (xr[j] - mu) * (xr[j] - mu);
      var /= static_cast<S>(f);
      const S rstd = S(1) / std::sqrt(var + static_cast<S>(eps));
      (*stats)[static_cast<std::size_t>(2 * r)] = mu;
      (*stats)[static_cast<std::size_t>(2 * r + 1)] = rstd;
      S* yr = out.data() + r * f;
      for (index j = 0; j < f; ++j) {
        const S xhat = (xr[j] - mu) * rstd;
        yr[j] = affine
                    ? xhat * in[1][static_cast<std::size_t>(j)] + in[2][static_cast<std::size_t>(j)]
                    : xhat;
      }
    }
  };
  auto backward = [stats, rows, f, affine](const custom_grad_args<S>& a) {
    const S* xv = a.inputs[0].data();
    const S* gy = a.grad_output.data();
    for (index r = 0; r < rows; ++r) {
      const S mu = (*stats)[static_cast<std::size_t>(2 * r)];
      const S rstd = (*stats)[static_cast<std::size_t>(2 * r + 1)];
      const S* xr = xv + r * f;
      const S* gr = gy + r * f;
      if (a.input == 1) {  // dgamma += dy * xhat
        for (index j = 0; j < f; ++j)
          a.grad_input[static_cast<std::size_t>(j)] += gr[j] * (xr[j] - mu) * rstd;
      } else if (a.input == 2) {  // dbeta += dy
        for (index j = 0; j < f; ++j) a.grad_input[static_cast<std::size_t>(j)] += gr[j];
      } else {  // dx = rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat)), dxhat = dy gamma
        S m1 = 0, m2 = 0;
        for (index j = 0; j < f; ++j) {
          const S d = affine ? gr[j] * a.inputs[1][static_cast<std::size_t>(j)] : gr[j];
          m1 += d;
          m2 += d * (xr[j] - mu) * rstd;
        }
        m1 /= static_cast<S>(f);
        m2 /= static_cast<S>(f);
        S* dx = a.grad_input.data() + r * f;
        for (index j = 0; j < f; ++j) {
          const S d = affine ? gr[j] * a.inputs[1][static_cast<std::size_t>(j)] : gr[j];
          dx[j] += rstd * (d - m1 - (xr[j] - mu) * rstd * m2);
        }
      }
    }
  };
  return detail::make_custom<S>("layer_norm", "", inputs, x.shape(), forward, std::move(backward));
}

// ---------------------------------------------------------------------------
// Layers

template <class S>
basic_conv2d_layer<S>::basic_conv2d_layer(index in_channels, index out_channels, index kernel,
                                          index stride, index padding, std::uint64_t seed,
                                          bool bias)
    : stride_(stride), padding_(padding) {
  if (in_channels <= 0 || out_channels <= 0 || kernel <= 0 || stride <= 0 || padding < 0) {
    throw usage_error(fmt::format(
        "ad::conv2d_layer: channels {} -> {}, kernel {}, stride {}, padding {}: channels, kernel "
        "and stride must be positive, padding >= 0",
        in_channels, out_channels, kernel, stride, padding));
  }
  weight_ = make_parameter<S>("weight", shape{out_channels, in_channels, kernel, kernel});
  generator rng(seed);
  const index fan_in = in_channels * kernel * kernel;
  initialize(weight_.data(), init_kind::kaiming_uniform, fan_in, out_channels, rng);
  if (bias) bias_ = make_parameter<S>("bias", shape{out_channels});
}

template <class S>
basic_tensor<S> basic_conv2d_layer<S>::forward(const basic_tensor<S>& x) {
  return conv2d(x, weight_, bias_, stride_, padding_);
}

template <class S>
void basic_conv2d_layer<S>::collect_parameters(named_parameters<S>& out,
                                               const std::string& prefix) const {
  out.emplace_back(prefix + "weight", weight_);
  if (bias_.defined()) out.emplace_back(prefix + "bias", bias_);
}

template <class S>
basic_reshape_layer<S>::basic_reshape_layer(std::vector<index> sample)
    : sample_(std::move(sample)) {
  if (sample_.empty() || sample_.size() > shape::max_rank - 1) {
    throw usage_error(fmt::format(
        "ad::reshape_layer: {} sample dimensions given; 1 to {} (plus the batch dimension)",
        sample_.size(), shape::max_rank - 1));
  }
}

template <class S>
basic_tensor<S> basic_reshape_layer<S>::forward(const basic_tensor<S>& x) {
  if (!x.defined()) throw usage_error("ad::reshape_layer: empty (default-constructed) tensor");
  const index b = x.shape().rank() >= 2 ? x.shape()[0] : 1;
  shape s;
  switch (sample_.size()) {
    case 1: s = shape{b, sample_[0]}; break;
    case 2: s = shape{b, sample_[0], sample_[1]}; break;
    default: s = shape{b, sample_[0], sample_[1], sample_[2]}; break;
  }
  return reshape(x, s);
}

template <class S>
basic_layer_norm_layer<S>::basic_layer_norm_layer(index features, double eps, bool affine)
    : eps_(eps) {
  if (features <= 0) {
    throw usage_error(fmt::format("ad::layer_norm_layer: {} features; need at least 1", features));
  }
  if (affine) {
    gamma_ = make_parameter<S>("gamma", shape{features});
    for (S& v : gamma_.data()) v = S(1);
    beta_ = make_parameter<S>("beta", shape{features});
  }
}

template <class S>
basic_tensor<S> basic_layer_norm_layer<S>::forward(const basic_tensor<S>& x) {
  return layer_norm(x, gamma_, beta_, eps_);
}

template <class S>
void basic_layer_norm_layer<S>::collect_parameters(named_parameters<S>& out,
                                                   const std::string& prefix) const {
  if (gamma_.defined()) out.emplace_back(prefix + "gamma", gamma_);
  if (beta_.defined()) out.emplace_back(prefix + "beta", beta_);
}

#define RINGFLOW_AD_CNN(S)                                                            \
  template basic_tensor<S> conv2d(const basic_tensor<S>&, const basic_tensor<S>&,     \
                                  const basic_tensor<S>&, index, index);              \
  template basic_tensor<S> max_pool2d(const basic_tensor<S>&, index, index, index);   \
  template basic_tensor<S> avg_pool2d(const basic_tensor<S>&, index, index, index);   \
  template basic_tensor<S> layer_norm(const basic_tensor<S>&, const basic_tensor<S>&, \
                                      const basic_tensor<S>&, double);                \
  template class basic_conv2d_layer<S>;                                               \
  template class basic_reshape_layer<S>;                                              \
  template class basic_layer_norm_layer<S>;
RINGFLOW_AD_CNN(float)
RINGFLOW_AD_CNN(double)
#undef RINGFLOW_AD_CNN

}  // namespace ringflow::ad
