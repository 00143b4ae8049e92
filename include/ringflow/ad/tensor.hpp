// Autodiff tensors: a cheap handle to a graph node holding an Eigen row-major
// value, its gradient, and the backward closure of the op that produced it;
// plus grad mode (no_grad) and reverse-mode backward (one or two phases).
#pragma once

#include <Eigen/Core>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "ringflow/ad/shape.hpp"
#include "ringflow/ad/sparse_grad.hpp"
#include "ringflow/core/error.hpp"

namespace ringflow::ad {

/// Dense row-major matrix of Scalar: the value type ops compute with.
template <class S>
using matrix = Eigen::Matrix<S, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
/// A mutable view of a tensor's value or gradient (no copy).
template <class S>
using matrix_map = Eigen::Map<matrix<S>>;

// ---------------------------------------------------------------------------
// Grad mode

/// True when ops record the graph (the default, per thread).
bool grad_enabled();
/// Turns graph recording on or off for the calling thread; prefer ad::no_grad.
void set_grad_enabled(bool on);

/// RAII scope in which ops record no graph and dropout is the identity.
/// @code
///   { ad::no_grad guard; auto logits = model(x); }   // evaluation
/// @endcode
class no_grad {
 public:
  no_grad();
  ~no_grad();
  no_grad(const no_grad&) = delete;
  no_grad& operator=(const no_grad&) = delete;

 private:
  bool previous_;
};

template <class S>
class basic_tensor;
template <class S>
class weight_grad_pass;

/// Options of ad::backward.
struct backward_options {
  /// Phase 1 only: compute gradients of activations and of leaf inputs, but
  /// not of parameters. The returned weight_grad_pass computes the parameter
  /// gradients later (zero-bubble pipeline schedules split B and W this way).
  bool defer_weight_grads = false;
};

namespace detail {

/// One vertex of the graph. Backward closures reach their operands through
/// `inputs` and never capture tensor handles, so destroying a node never
/// recurses through a closure; ~node tears its input chain down iteratively.
template <class S>
struct node : std::enable_shared_from_this<node<S>> {
  /// Adds this node's contribution to the gradient of inputs[i].
  using backward_fn = std::function<void(node&, std::size_t)>;

  ad::shape dims;
  std::shared_ptr<S> value;  // numel elements; may alias a parameter store or a user buffer
  std::shared_ptr<S> grad;   // null until the first contribution (interior nodes)
  std::vector<std::shared_ptr<node>> inputs;
  backward_fn backward;
  std::function<void(node&)> grad_ready;  // fired once the gradient is final
  // Where a leaf's gradient comes from when grad is null (empty: allocate()).
  // A store with released gradients places them (parameter_store::release_grads).
  std::function<std::shared_ptr<S>()> make_grad;
  // Where a leaf's value comes from when value is null: a store with
  // released values (parameter_store::release_values; ZeRO stage 3 gathers
  // them) makes it here, on the first read.
  std::function<std::shared_ptr<S>()> make_value;
  // A table parameter with sparse row gradients (ad::embedding with sparse
  // on): its backward adds rows here and leaves `grad` alone.
  std::shared_ptr<sparse_rows_grad<S>> sparse;
  std::string name;
  const char* op = "leaf";
  bool requires_grad = false;
  bool is_parameter = false;
  // Scratch of the backward in progress.
  std::uint64_t mark = 0;
  std::size_t pending = 0;

  node() = default;
  node(const node&) = delete;
  node& operator=(const node&) = delete;
  ~node();

  bool is_leaf() const { return inputs.empty(); }
  index rows() const { return dims.rows(); }
  index cols() const { return dims.cols(); }
  /// The value, made first when released (make_value). Every read of an
  /// op's inputs goes through here; the check is on a pointer that is
  /// almost always set.
  S* value_ptr() const {
    if (!value && make_value) [[unlikely]]
      materialize();
    return value.get();
  }
  matrix_map<S> value_map() const { return {value_ptr(), rows(), cols()}; }
  /// The gradient, allocated (zeros) on first use.
  matrix_map<S> grad_map();

 private:
  void materialize() const;
};

/// `n` zero-initialized elements, shared.
template <class S>
std::shared_ptr<S> allocate(index n);
/// `n` elements, uninitialized (for a writer that fills every one). Large
/// buffers of both come from a process-wide cache of freed buffers.
template <class S>
std::shared_ptr<S> allocate_uninitialized(index n);

}  // namespace detail

/// An autodiff tensor: a cheap, copyable handle (shared_ptr) to a graph node.
/// Copies share the value, the gradient and the graph. Values are float by
/// default (`ad::tensor`); `basic_tensor<double>` exists for gradient checks.
/// @code
///   auto x = ad::tensor::from_data(batch_ptr, {64, 784});    // no copy
///   auto loss = ad::softmax_cross_entropy(model(x), labels);
///   loss.backward();
/// @endcode
template <class S>
class basic_tensor {
 public:
  using scalar_type = S;
  using node_type = detail::node<S>;

  /// An empty handle (defined() is false).
  basic_tensor() = default;
  explicit basic_tensor(std::shared_ptr<node_type> n) : node_(std::move(n)) {}

  /// A new leaf filled with zeros.
  static basic_tensor zeros(ad::shape s, bool requires_grad = false);
  /// A new leaf filled with `value`.
  static basic_tensor full(ad::shape s, S value, bool requires_grad = false);
  /// A new leaf holding a single value (rank 0).
  static basic_tensor scalar(S value, bool requires_grad = false);
  /// A new leaf copying `values` (row-major, values.size() == s.numel()).
  static basic_tensor from_vector(std::vector<S> values, ad::shape s, bool requires_grad = false);
  /// A new leaf copying an Eigen matrix; shape [rows, cols].
  static basic_tensor from_matrix(const matrix<S>& m, bool requires_grad = false);
  /// A leaf that VIEWS `data` (row-major, s.numel() elements) without copying.
  /// The caller keeps the buffer alive and unchanged while the tensor or any
  /// graph built from it lives. Ops never write into it.
  static basic_tensor from_data(const S* data, ad::shape s);
  /// from_data with a size check: data.size() must equal s.numel().
  static basic_tensor from_data(std::span<const S> data, ad::shape s);

  bool defined() const { return node_ != nullptr; }
  const ad::shape& shape() const { return checked().dims; }
  index rows() const { return shape().rows(); }
  index cols() const { return shape().cols(); }
  index numel() const { return shape().numel(); }

  /// The value as a row-major [rows, cols] Eigen view (writable: for
  /// parameters this is the parameter store's memory).
  matrix_map<S> value() const { return checked().value_map(); }
  /// The gradient as an Eigen view; allocates zeros if there is none yet.
  matrix_map<S> grad() const { return checked().grad_map(); }
  bool has_grad() const { return checked().grad != nullptr; }
  /// The sparse row gradient of a table parameter (ad::embedding with
  /// sparse on), or null for a dense gradient. Optimizers and
  /// train::data_parallel use it in place of grad() for such a parameter.
  sparse_rows_grad<S>* sparse_grad() const { return checked().sparse.get(); }
  std::span<S> data() const;
  std::span<S> grad_data() const;
  /// The single element of a one-element tensor (throws usage_error otherwise).
  S item() const;

  bool requires_grad() const { return checked().requires_grad; }
  /// Marks a leaf as needing a gradient (throws usage_error on an op result).
  basic_tensor& set_requires_grad(bool on = true);
  bool is_leaf() const { return checked().is_leaf(); }
  bool is_parameter() const { return checked().is_parameter; }
  /// The parameter name ("0.weight"), or the op that made it ("matmul").
  std::string name() const;
  /// Sets the gradient (dense and sparse) to zero (leaves accumulate over backward calls).
  void zero_grad() const;
  /// A leaf sharing this value, outside the graph.
  basic_tensor detach() const;

  /// ad::backward(*this, opts).
  weight_grad_pass<S> backward(backward_options opts = {}) const;

  /// Calls `hook(tensor)` during backward as soon as this leaf's gradient is
  /// final, once per backward. The hook must not capture a handle to this
  /// tensor (that would be a reference cycle); it receives one.
  void set_grad_ready_hook(std::function<void(const basic_tensor&)> hook) const;

  const std::shared_ptr<node_type>& node() const { return node_; }

 private:
  node_type& checked() const;
  std::shared_ptr<node_type> node_;
};

using tensor = basic_tensor<float>;

/// Deferred parameter gradients of a two-phase backward (see backward_options).
/// Run it once, before the next backward over the same graph; parameters'
/// grad-ready hooks fire inside run(). Dropping it un-run loses those grads.
template <class S>
class weight_grad_pass {
 public:
  weight_grad_pass() = default;
  /// Logs a warning when dropped with deferred gradients never run.
  ~weight_grad_pass();
  weight_grad_pass(weight_grad_pass&&) noexcept = default;
  weight_grad_pass& operator=(weight_grad_pass&&) noexcept = default;

  /// Number of deferred (op, parameter) gradient contributions not yet run.
  std::size_t size() const { return edges_.size(); }
  bool empty() const { return edges_.empty(); }
  /// Computes every deferred parameter gradient, firing grad-ready hooks.
  void run();

  // Used by backward.
  void add(std::shared_ptr<detail::node<S>> consumer, std::size_t input);

 private:
  std::vector<std::pair<std::shared_ptr<detail::node<S>>, std::size_t>> edges_;
  std::unordered_map<detail::node<S>*, std::size_t> remaining_;
};

/// Reverse-mode backward from a one-element tensor (seed 1). Every node is
/// processed after all its consumers (an iterative topological order: no
/// recursion, so graphs of any depth are fine). Leaves accumulate into .grad()
/// until zero_grad(); grad-ready hooks fire once per leaf, after its last
/// contribution. With {.defer_weight_grads = true} parameter gradients are
/// left to the returned pass.
template <class S>
weight_grad_pass<S> backward(const basic_tensor<S>& root, backward_options opts = {});
/// Backward seeded with `grad_output` (same shape as root), e.g. the gradient
/// a pipeline stage receives from the next stage.
template <class S>
weight_grad_pass<S> backward(const basic_tensor<S>& root, const basic_tensor<S>& grad_output,
                             backward_options opts = {});
/// Runs the deferred parameter gradients of a two-phase backward.
template <class S>
void run_weight_grads(weight_grad_pass<S>& pass) {
  pass.run();
}

extern template struct detail::node<float>;
extern template struct detail::node<double>;
extern template class basic_tensor<float>;
extern template class basic_tensor<double>;
extern template class weight_grad_pass<float>;
extern template class weight_grad_pass<double>;

}  // namespace ringflow::ad
