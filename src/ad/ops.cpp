// Forward values and backward closures of every ad op, for float and double.
#include "ringflow/ad/ops.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <numbers>

#include "ringflow/ad/gemm.hpp"
#include "ringflow/ad/init.hpp"

namespace ringflow::ad {

namespace {

template <class S>
using node_ptr = std::shared_ptr<detail::node<S>>;
template <class S>
using array = Eigen::Array<S, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

template <class S>
const detail::node<S>& need(const basic_tensor<S>& t, const char* op) {
  if (!t.defined()) {
    throw usage_error(fmt::format("ad::{}: empty (default-constructed) tensor passed", op));
  }
  t.node()->value_ptr();  // a released parameter value is made now
  return *t.node();
}

// A fresh output node with an allocated (zeroed) value.
template <class S>
node_ptr<S> make_node(const char* op, const shape& s) {
  auto n = std::make_shared<detail::node<S>>();
  n->op = op;
  n->dims = s;
  n->value = detail::allocate<S>(s.numel());
  return n;
}

// Attaches inputs and the backward closure when the graph is recorded.
template <class S>
basic_tensor<S> finish(node_ptr<S> out, std::vector<node_ptr<S>> inputs,
                       typename detail::node<S>::backward_fn fn) {
  if (grad_enabled() &&
      std::any_of(inputs.begin(), inputs.end(), [](const auto& n) { return n->requires_grad; })) {
    out->inputs = std::move(inputs);
    out->backward = std::move(fn);
    out->requires_grad = true;
  }
  return basic_tensor<S>(std::move(out));
}

// Adds g to n's gradient, summing over the dimensions n was broadcast along.
template <class S, class Derived>
void accumulate_reduced(detail::node<S>& n, const Eigen::MatrixBase<Derived>& g) {
  auto grad = n.grad_map();
  if (g.rows() == grad.rows() && g.cols() == grad.cols()) {
    grad += g;
  } else if (grad.rows() == 1 && grad.cols() == 1) {
    grad(0, 0) += g.sum();
  } else if (grad.rows() == 1) {
    grad += g.colwise().sum();
  } else {
    grad += g.rowwise().sum();
  }
}

// An operand replicated to [rows, cols] (a no-op copy when already that size).
template <class S>
matrix<S> expand(const matrix_map<S>& m, index rows, index cols) {
  if (m.rows() == rows && m.cols() == cols) return m;
  return m.replicate(rows / m.rows(), cols / m.cols());
}

shape broadcast_shape(const char* op, const shape& a, const shape& b) {
  auto dim = [](index x, index y, index& out) {
    if (x == y || y == 1) {
      out = x;
      return true;
    }
    if (x == 1) {
      out = y;
      return true;
    }
    return false;
  };
  index rows = 0, cols = 0;
  if (!dim(a.rows(), b.rows(), rows) || !dim(a.cols(), b.cols(), cols)) {
    throw usage_error(fmt::format(
        "ad::{}: shapes {} and {} do not broadcast: each dimension must be equal or 1 (e.g. "
        "[B,N] with [1,N] or [N]); reshape or slice one operand",
        op, a.str(), b.str()));
  }
  const int rank = std::max(a.rank(), b.rank());
  // An image (rank 3-4) keeps its shape when the other operand broadcasts into it.
  if (rank > 2) {
    if (a.rank() > 2 && a.rows() == rows && a.cols() == cols) return a;
    if (b.rank() > 2 && b.rows() == rows && b.cols() == cols) return b;
  }
  if (rank >= 2 || rows != 1) return shape{rows, cols};
  if (rank == 1) return shape{cols};
  return shape{};
}

// Calls fn(a, b) with both operands as [out.rows, out.cols] Eigen arrays:
// the values themselves when no broadcasting is needed, else expanded copies.
template <class S, class Fn>
decltype(auto) with_operands(const detail::node<S>& na, const detail::node<S>& nb, const shape& out,
                             Fn&& fn) {
  const bool a_full = na.rows() == out.rows() && na.cols() == out.cols();
  const bool b_full = nb.rows() == out.rows() && nb.cols() == out.cols();
  if (a_full && b_full) return fn(na.value_map().array(), nb.value_map().array());
  const matrix<S> av = expand<S>(na.value_map(), out.rows(), out.cols());
  const matrix<S> bv = expand<S>(nb.value_map(), out.rows(), out.cols());
  return fn(av.array(), bv.array());
}

// `backward(i, g, a, b)` gives the gradient of input i at the output's shape;
// it is summed down to the input's shape where that input was broadcast.
template <class S, class Forward, class Backward>
basic_tensor<S> elementwise_binary(const char* op, const basic_tensor<S>& a,
                                   const basic_tensor<S>& b, Forward forward, Backward backward,
                                   bool backward_reads_values = true) {
  const auto& na = need(a, op);
  const auto& nb = need(b, op);
  const shape s = broadcast_shape(op, na.dims, nb.dims);
  auto out = make_node<S>(op, s);
  auto ov = out->value_map();
  with_operands<S>(na, nb, s, [&](const auto& x, const auto& y) { ov = forward(x, y).matrix(); });
  return finish<S>(std::move(out), {a.node(), b.node()},
                   [backward, s, backward_reads_values](detail::node<S>& self, std::size_t i) {
                     const auto g = self.grad_map().array();
                     if (!backward_reads_values) {  // add, sub: no operand copies needed
                       accumulate_reduced(*self.inputs[i], backward(i, g, g, g).matrix());
                       return;
                     }
                     with_operands<S>(
                         *self.inputs[0], *self.inputs[1], s, [&](const auto& x, const auto& y) {
                           accumulate_reduced(*self.inputs[i], backward(i, g, x, y).matrix());
                         });
                   });
}

// Elementwise unary op; `df(x, y)` is dy/dx from the input x and output y.
template <class S, class F, class DF>
basic_tensor<S> elementwise_unary(const char* op, const basic_tensor<S>& x, F f, DF df) {
  const auto& nx = need(x, op);
  auto out = make_node<S>(op, nx.dims);
  out->value_map() = f(nx.value_map().array()).matrix();
  return finish<S>(std::move(out), {x.node()}, [df](detail::node<S>& self, std::size_t) {
    const auto xv = self.inputs[0]->value_map().array();
    const auto yv = self.value_map().array();
    self.inputs[0]->grad_map().array() += self.grad_map().array() * df(xv, yv);
  });
}

}  // namespace

template <class S>
basic_tensor<S> matmul(const basic_tensor<S>& a, const basic_tensor<S>& b) {
  const auto& na = need(a, "matmul");
  const auto& nb = need(b, "matmul");
  if (nb.dims.rank() != 2 || na.dims.rank() == 0 || na.dims.rank() > 2 || na.cols() != nb.rows()) {
    throw usage_error(fmt::format(
        "ad::matmul: shapes {} and {} are not compatible: need [B,K] (or [K]) times [K,N]; "
        "the inner dimensions must agree",
        na.dims.str(), nb.dims.str()));
  }
  const shape s = na.dims.rank() == 2 ? shape{na.rows(), nb.cols()} : shape{nb.cols()};
  auto out = make_node<S>("matmul", s);
  // [m,k] x [k,n]: the products go through ad::gemm (a BLAS when present).
  const index m = na.rows(), k = na.cols(), n = nb.cols();
  gemm<S>(false, false, m, n, k, S(1), na.value.get(), k, nb.value.get(), n, S(0), out->value.get(),
          n);
  return finish<S>(std::move(out), {a.node(), b.node()},
                   [m, n, k](detail::node<S>& self, std::size_t i) {
                     auto g = self.grad_map();
                     auto& x = *self.inputs[0];
                     auto& w = *self.inputs[1];
                     if (i == 0) {  // dx [m,k] += g [m,n] * w^T
                       gemm<S>(false, true, m, k, n, S(1), g.data(), n, w.value.get(), n, S(1),
                               x.grad_map().data(), k);
                     } else {  // dw [k,n] += x^T * g
                       gemm<S>(true, false, k, n, m, S(1), x.value.get(), k, g.data(), n, S(1),
                               w.grad_map().data(), n);
                     }
                   });
}

template <class S>
basic_tensor<S> add(const basic_tensor<S>& a, const basic_tensor<S>& b) {
  return elementwise_binary<S>(
      "add", a, b, [](const auto& x, const auto& y) { return x + y; },
      [](std::size_t, const auto& g, const auto&, const auto&) { return g; }, false);
}

template <class S>
basic_tensor<S> sub(const basic_tensor<S>& a, const basic_tensor<S>& b) {
  return elementwise_binary<S>(
      "sub", a, b, [](const auto& x, const auto& y) { return x - y; },
      [](std::size_t i, const auto& g, const auto&, const auto&) -> array<S> {
        if (i == 0) return g;
        return -g;
      },
      false);
}

template <class S>
basic_tensor<S> mul(const basic_tensor<S>& a, const basic_tensor<S>& b) {
  return elementwise_binary<S>(
      "mul", a, b, [](const auto& x, const auto& y) { return x * y; },
      [](std::size_t i, const auto& g, const auto& x, const auto& y) -> array<S> {
        if (i == 0) return g * y;
        return g * x;
      });
}

template <class S>
basic_tensor<S> div(const basic_tensor<S>& a, const basic_tensor<S>& b) {
  return elementwise_binary<S>(
      "div", a, b, [](const auto& x, const auto& y) { return x / y; },
      [](std::size_t i, const auto& g, const auto& x, const auto& y) -> array<S> {
        if (i == 0) return g / y;
        return -g * x / (y * y);
      });
}

template <class S>
basic_tensor<S> scale(const basic_tensor<S>& x, S factor) {
  const auto& nx = need(x, "scale");
  auto out = make_node<S>("scale", nx.dims);
  out->value_map() = nx.value_map() * factor;
  return finish<S>(std::move(out), {x.node()}, [factor](detail::node<S>& self, std::size_t) {
    self.inputs[0]->grad_map() += self.grad_map() * factor;
  });
}

template <class S>
basic_tensor<S> sum(const basic_tensor<S>& x) {
  const auto& nx = need(x, "sum");
  auto out = make_node<S>("sum", shape{});
  *out->value = nx.value_map().sum();
  return finish<S>(std::move(out), {x.node()}, [](detail::node<S>& self, std::size_t) {
    self.inputs[0]->grad_map().array() += *self.grad;
  });
}

template <class S>
basic_tensor<S> mean(const basic_tensor<S>& x) {
  const auto& nx = need(x, "mean");
  if (nx.dims.numel() == 0) {
    throw usage_error("ad::mean: tensor of shape " + nx.dims.str() + " has no elements");
  }
  auto out = make_node<S>("mean", shape{});
  *out->value = nx.value_map().mean();
  return finish<S>(std::move(out), {x.node()}, [](detail::node<S>& self, std::size_t) {
    auto& in = *self.inputs[0];
    in.grad_map().array() += *self.grad / static_cast<S>(in.dims.numel());
  });
}

template <class S>
basic_tensor<S> relu(const basic_tensor<S>& x) {
  return elementwise_unary<S>(
      "relu", x, [](const auto& v) { return v.max(S(0)); },
      [](const auto& v, const auto&) { return (v > S(0)).template cast<S>(); });
}

namespace {
template <class S>
constexpr S gelu_k = static_cast<S>(0.7978845608028654);  // sqrt(2/pi)
template <class S>
constexpr S gelu_c = static_cast<S>(0.044715);
}  // namespace

template <class S>
basic_tensor<S> gelu(const basic_tensor<S>& x) {
  return elementwise_unary<S>(
      "gelu", x,
      [](const auto& v) {
        return S(0.5) * v * (S(1) + (gelu_k<S> * (v + gelu_c<S> * v * v * v)).tanh());
      },
      [](const auto& v, const auto&) {
        const array<S> t = (gelu_k<S> * (v + gelu_c<S> * v * v * v)).tanh();
        return (S(0.5) * (S(1) + t) +
                S(0.5) * v * (S(1) - t * t) * gelu_k<S> * (S(1) + S(3) * gelu_c<S> * v * v))
            .eval();
      });
}

template <class S>
basic_tensor<S> tanh(const basic_tensor<S>& x) {
  return elementwise_unary<S>(
      "tanh", x, [](const auto& v) { return v.tanh(); },
      [](const auto&, const auto& y) { return S(1) - y * y; });
}

template <class S>
basic_tensor<S> sigmoid(const basic_tensor<S>& x) {
  return elementwise_unary<S>(
      "sigmoid", x, [](const auto& v) { return S(1) / (S(1) + (-v).exp()); },
      [](const auto&, const auto& y) { return y * (S(1) - y); });
}

template <class S>
basic_tensor<S> exp(const basic_tensor<S>& x) {
  return elementwise_unary<S>(
      "exp", x, [](const auto& v) { return v.exp(); },
      [](const auto&, const auto& y) { return y; });
}

template <class S>
basic_tensor<S> log(const basic_tensor<S>& x) {
  return elementwise_unary<S>(
      "log", x, [](const auto& v) { return v.log(); },
      [](const auto& v, const auto&) { return v.inverse(); });
}

namespace {
template <class S>
matrix<S> log_softmax_rows(const matrix_map<S>& x) {
  matrix<S> z = x.colwise() - x.rowwise().maxCoeff();
  const auto lse = z.array().exp().rowwise().sum().log().matrix().eval();
  z.colwise() -= lse;
  return z;
}
}  // namespace

template <class S>
basic_tensor<S> log_softmax(const basic_tensor<S>& x) {
  const auto& nx = need(x, "log_softmax");
  if (nx.dims.numel() == 0) throw usage_error("ad::log_softmax: empty tensor " + nx.dims.str());
  auto out = make_node<S>("log_softmax", nx.dims);
  out->value_map() = log_softmax_rows<S>(nx.value_map());
  return finish<S>(std::move(out), {x.node()}, [](detail::node<S>& self, std::size_t) {
    auto g = self.grad_map();
    const matrix<S> p = self.value_map().array().exp().matrix();
    const auto gsum = g.rowwise().sum().eval();
    self.inputs[0]->grad_map() += g - (p.array().colwise() * gsum.array()).matrix();
  });
}

template <class S>
basic_tensor<S> softmax(const basic_tensor<S>& x) {
  return exp(log_softmax(x));
}

template <class S>
basic_tensor<S> softmax_cross_entropy(const basic_tensor<S>& logits, std::span<const int> labels) {
  const auto& nl = need(logits, "softmax_cross_entropy");
  if (nl.dims.rank() != 2 || static_cast<index>(labels.size()) != nl.rows() || nl.rows() == 0) {
    throw usage_error(fmt::format(
        "ad::softmax_cross_entropy: logits of shape {} with {} labels; need logits [B,C] with "
        "B > 0 and exactly B labels",
        nl.dims.str(), labels.size()));
  }
  const index classes = nl.cols();
  for (std::size_t b = 0; b < labels.size(); ++b) {
    if (labels[b] < 0 || labels[b] >= classes) {
      throw usage_error(fmt::format(
          "ad::softmax_cross_entropy: label {} of row {} is outside [0, {}) for logits {}",
          labels[b], b, classes, nl.dims.str()));
    }
  }
  const matrix<S> logp = log_softmax_rows<S>(nl.value_map());
  S total = 0;
  for (index b = 0; b < logp.rows(); ++b) total -= logp(b, labels[static_cast<std::size_t>(b)]);
  auto out = make_node<S>("softmax_cross_entropy", shape{});
  *out->value = total / static_cast<S>(logp.rows());
  // The closure keeps softmax - onehot (scaled by 1/B): the whole gradient.
  matrix<S> dlogits = logp.array().exp().matrix();
  for (index b = 0; b < dlogits.rows(); ++b)
    dlogits(b, labels[static_cast<std::size_t>(b)]) -= S(1);
  dlogits /= static_cast<S>(dlogits.rows());
  return finish<S>(std::move(out), {logits.node()},
                   [dlogits = std::move(dlogits)](detail::node<S>& self, std::size_t) {
                     self.inputs[0]->grad_map() += dlogits * *self.grad;
                   });
}

template <class S>
basic_tensor<S> mse(const basic_tensor<S>& prediction, const basic_tensor<S>& target) {
  const auto& np = need(prediction, "mse");
  const auto& nt = need(target, "mse");
  if (np.rows() != nt.rows() || np.cols() != nt.cols() || np.dims.numel() == 0) {
    throw usage_error(
        fmt::format("ad::mse: prediction {} and target {} must have the same (non-empty) shape",
                    np.dims.str(), nt.dims.str()));
  }
  auto out = make_node<S>("mse", shape{});
  *out->value = (np.value_map() - nt.value_map()).squaredNorm() / static_cast<S>(np.dims.numel());
  return finish<S>(std::move(out), {prediction.node(), target.node()},
                   [](detail::node<S>& self, std::size_t i) {
                     auto& p = *self.inputs[0];
                     auto& t = *self.inputs[1];
                     const S k = S(2) * *self.grad / static_cast<S>(p.dims.numel());
                     const S sign = i == 0 ? S(1) : S(-1);
                     self.inputs[i]->grad_map() += (sign * k) * (p.value_map() - t.value_map());
                   });
}

template <class S>
basic_tensor<S> reshape(const basic_tensor<S>& x, shape s) {
  const auto& nx = need(x, "reshape");
  if (s.numel() != nx.dims.numel()) {
    throw usage_error(
        fmt::format("ad::reshape: cannot reshape {} ({} elements) to {} ({} elements); the element "
                    "counts must match",
                    nx.dims.str(), nx.dims.numel(), s.str(), s.numel()));
  }
  auto out = std::make_shared<detail::node<S>>();
  out->op = "reshape";
  out->dims = s;
  out->value = nx.value;  // same row-major elements: share them
  return finish<S>(std::move(out), {x.node()}, [](detail::node<S>& self, std::size_t) {
    auto& in = *self.inputs[0];
    const index n = self.dims.numel();
    in.grad_map();
    Eigen::Map<Eigen::Matrix<S, Eigen::Dynamic, 1>>(in.grad.get(), n) +=
        Eigen::Map<Eigen::Matrix<S, Eigen::Dynamic, 1>>(self.grad.get(), n);
  });
}

template <class S>
basic_tensor<S> flatten(const basic_tensor<S>& x) {
  return reshape(x, shape{need(x, "flatten").dims.numel()});
}

template <class S>
basic_tensor<S> flatten(const basic_tensor<S>& x, int start_dim) {
  const auto& nx = need(x, "flatten");
  if (start_dim == 0) return flatten(x);
  if (start_dim != 1 || nx.dims.rank() < 2) {
    throw usage_error(fmt::format(
        "ad::flatten: start_dim {} is not valid for shape {}; use 0 (everything) or 1 (keep the "
        "batch dimension of a rank >= 2 tensor)",
        start_dim, nx.dims.str()));
  }
  return reshape(x, shape{nx.rows(), nx.cols()});
}

namespace {
// Which axis of the [rows, cols] view `dim` names, for a tensor of `rank`.
int view_axis(const char* op, const shape& s, int dim) {
  if (s.rank() == 2 && (dim == 0 || dim == 1)) return dim;
  if (s.rank() == 1 && dim == 0) return 1;
  throw usage_error(fmt::format(
      "ad::{}: dim {} is not valid for shape {}; use dim 0 or 1 for rank-2 tensors and dim 0 "
      "for rank-1 tensors",
      op, dim, s.str()));
}
}  // namespace

namespace {
template <class S>
basic_tensor<S> reduce_dim(const char* op, const basic_tensor<S>& x, int dim, bool keepdim,
                           bool average) {
  const auto& nx = need(x, op);
  const int axis = view_axis(op, nx.dims, dim);
  const index n = axis == 0 ? nx.rows() : nx.cols();  // elements reduced per output
  if (n == 0)
    throw usage_error(fmt::format("ad::{}: dim {} of {} is empty", op, dim, nx.dims.str()));
  shape s;
  if (nx.dims.rank() == 1) {
    s = keepdim ? shape{1} : shape{};
  } else if (axis == 0) {
    s = keepdim ? shape{1, nx.cols()} : shape{nx.cols()};
  } else {
    s = keepdim ? shape{nx.rows(), 1} : shape{nx.rows()};
  }
  const S factor = average ? S(1) / static_cast<S>(n) : S(1);
  auto out = make_node<S>(op, s);
  using vector = Eigen::Matrix<S, Eigen::Dynamic, 1>;
  Eigen::Map<vector> ov(out->value.get(), s.numel());
  if (axis == 0) {
    ov = nx.value_map().colwise().sum().transpose() * factor;
  } else {
    ov = nx.value_map().rowwise().sum() * factor;
  }
  return finish<S>(std::move(out), {x.node()}, [axis, factor](detail::node<S>& self, std::size_t) {
    self.grad_map();
    const Eigen::Map<vector> g(self.grad.get(), self.dims.numel());
    auto in = self.inputs[0]->grad_map();
    if (axis == 0) {
      in.rowwise() += g.transpose() * factor;
    } else {
      in.colwise() += g * factor;
    }
  });
}
}  // namespace

template <class S>
basic_tensor<S> sum(const basic_tensor<S>& x, int dim, bool keepdim) {
  return reduce_dim<S>("sum", x, dim, keepdim, false);
}

template <class S>
basic_tensor<S> mean(const basic_tensor<S>& x, int dim, bool keepdim) {
  return reduce_dim<S>("mean", x, dim, keepdim, true);
}

template <class S>
basic_tensor<S> concat(const std::vector<basic_tensor<S>>& parts, int dim) {
  if (parts.empty()) throw usage_error("ad::concat: no tensors given");
  const auto& first = need(parts[0], "concat");
  const int axis = view_axis("concat", first.dims, dim);
  index total = 0;
  std::vector<node_ptr<S>> inputs;
  for (const auto& p : parts) {
    const auto& n = need(p, "concat");
    const bool ok = n.dims.rank() == first.dims.rank() &&
                    (axis == 0 ? n.cols() == first.cols() : n.rows() == first.rows());
    if (!ok) {
      throw usage_error(fmt::format(
          "ad::concat: shapes {} and {} cannot be joined along dim {}: same rank and the same "
          "size on the other dimension needed",
          first.dims.str(), n.dims.str(), dim));
    }
    total += axis == 0 ? n.rows() : n.cols();
    inputs.push_back(p.node());
  }
  const shape s = first.dims.rank() == 1 ? shape{total}
                  : axis == 0            ? shape{total, first.cols()}
                                         : shape{first.rows(), total};
  auto out = make_node<S>("concat", s);
  auto v = out->value_map();
  index at = 0;
  std::vector<index> offsets;
  for (const auto& n : inputs) {
    offsets.push_back(at);
    if (axis == 0) {
      v.middleRows(at, n->rows()) = n->value_map();
      at += n->rows();
    } else {
      v.middleCols(at, n->cols()) = n->value_map();
      at += n->cols();
    }
  }
  return finish<S>(std::move(out), std::move(inputs),
                   [axis, offsets = std::move(offsets)](detail::node<S>& self, std::size_t i) {
                     auto& in = *self.inputs[i];
                     auto g = self.grad_map();
                     if (axis == 0) {
                       in.grad_map() += g.middleRows(offsets[i], in.rows());
                     } else {
                       in.grad_map() += g.middleCols(offsets[i], in.cols());
                     }
                   });
}

template <class S>
basic_tensor<S> slice(const basic_tensor<S>& x, int dim, index begin, index end) {
  const auto& nx = need(x, "slice");
  const int axis = view_axis("slice", nx.dims, dim);
  const index extent = axis == 0 ? nx.rows() : nx.cols();
  if (begin < 0 || end > extent || begin > end) {
    throw usage_error(
        fmt::format("ad::slice: range [{}, {}) is outside dim {} of shape {} (size {})", begin, end,
                    dim, nx.dims.str(), extent));
  }
  const index len = end - begin;
  const shape s = nx.dims.rank() == 1 ? shape{len}
                  : axis == 0         ? shape{len, nx.cols()}
                                      : shape{nx.rows(), len};
  auto out = make_node<S>("slice", s);
  if (axis == 0) {
    out->value_map() = nx.value_map().middleRows(begin, len);
  } else {
    out->value_map() = nx.value_map().middleCols(begin, len);
  }
  return finish<S>(std::move(out), {x.node()},
                   [axis, begin, len](detail::node<S>& self, std::size_t) {
                     auto g = self.grad_map();
                     auto in = self.inputs[0]->grad_map();
                     if (axis == 0) {
                       in.middleRows(begin, len) += g;
                     } else {
                       in.middleCols(begin, len) += g;
                     }
                   });
}

template <class S>
basic_tensor<S> dropout(const basic_tensor<S>& x, double p, generator& rng, bool training) {
  const auto& nx = need(x, "dropout");
  if (!(p >= 0.0 && p < 1.0)) {
    throw usage_error(fmt::format("ad::dropout: probability {} is outside [0, 1)", p));
  }
  if (!training || !grad_enabled() || p == 0.0) return x;
  const S keep_scale = static_cast<S>(1.0 / (1.0 - p));
  matrix<S> mask(nx.rows(), nx.cols());
  for (index k = 0; k < mask.size(); ++k) {
    mask.data()[k] = uniform01(rng) >= p ? keep_scale : S(0);
  }
  auto out = make_node<S>("dropout", nx.dims);
  out->value_map() = nx.value_map().cwiseProduct(mask);
  return finish<S>(std::move(out), {x.node()},
                   [mask = std::move(mask)](detail::node<S>& self, std::size_t) {
                     self.inputs[0]->grad_map() += self.grad_map().cwiseProduct(mask);
                   });
}

template <class S>
std::vector<int> argmax_rows(const basic_tensor<S>& x) {
  const auto& nx = need(x, "argmax_rows");
  auto v = nx.value_map();
  std::vector<int> out(static_cast<std::size_t>(v.rows()));
  for (index r = 0; r < v.rows(); ++r) {
    index c = 0;
    v.row(r).maxCoeff(&c);
    out[static_cast<std::size_t>(r)] = static_cast<int>(c);
  }
  return out;
}

#define RINGFLOW_AD_OPS(S)                                                                      \
  template basic_tensor<S> matmul(const basic_tensor<S>&, const basic_tensor<S>&);              \
  template basic_tensor<S> add(const basic_tensor<S>&, const basic_tensor<S>&);                 \
  template basic_tensor<S> sub(const basic_tensor<S>&, const basic_tensor<S>&);                 \
  template basic_tensor<S> mul(const basic_tensor<S>&, const basic_tensor<S>&);                 \
  template basic_tensor<S> div(const basic_tensor<S>&, const basic_tensor<S>&);                 \
  template basic_tensor<S> scale(const basic_tensor<S>&, S);                                    \
  template basic_tensor<S> sum(const basic_tensor<S>&);                                         \
  template basic_tensor<S> mean(const basic_tensor<S>&);                                        \
  template basic_tensor<S> sum(const basic_tensor<S>&, int, bool);                              \
  template basic_tensor<S> mean(const basic_tensor<S>&, int, bool);                             \
  template basic_tensor<S> relu(const basic_tensor<S>&);                                        \
  template basic_tensor<S> gelu(const basic_tensor<S>&);                                        \
  template basic_tensor<S> tanh(const basic_tensor<S>&);                                        \
  template basic_tensor<S> sigmoid(const basic_tensor<S>&);                                     \
  template basic_tensor<S> exp(const basic_tensor<S>&);                                         \
  template basic_tensor<S> log(const basic_tensor<S>&);                                         \
  template basic_tensor<S> log_softmax(const basic_tensor<S>&);                                 \
  template basic_tensor<S> softmax(const basic_tensor<S>&);                                     \
  template basic_tensor<S> softmax_cross_entropy(const basic_tensor<S>&, std::span<const int>); \
  template basic_tensor<S> mse(const basic_tensor<S>&, const basic_tensor<S>&);                 \
  template basic_tensor<S> reshape(const basic_tensor<S>&, shape);                              \
  template basic_tensor<S> flatten(const basic_tensor<S>&);                                     \
  template basic_tensor<S> flatten(const basic_tensor<S>&, int);                                \
  template basic_tensor<S> concat(const std::vector<basic_tensor<S>>&, int);                    \
  template basic_tensor<S> slice(const basic_tensor<S>&, int, index, index);                    \
  template basic_tensor<S> dropout(const basic_tensor<S>&, double, generator&, bool);           \
  template std::vector<int> argmax_rows(const basic_tensor<S>&);
RINGFLOW_AD_OPS(float)
RINGFLOW_AD_OPS(double)
#undef RINGFLOW_AD_OPS

}  // namespace ringflow::ad
