// Graph nodes, tensor handles, grad mode and the iterative reverse-mode backward.
#include "ringflow/ad/tensor.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <mutex>
#include <new>
#include <unordered_map>
#include <vector>

#include "ringflow/core/log.hpp"

namespace ringflow::ad {

namespace {
thread_local bool grad_mode = true;
std::atomic<std::uint64_t> backward_epoch{0};
}  // namespace

bool grad_enabled() { return grad_mode; }
void set_grad_enabled(bool on) { grad_mode = on; }

no_grad::no_grad() : previous_(grad_mode) { grad_mode = false; }
no_grad::~no_grad() { grad_mode = previous_; }

namespace detail {

// Large value and gradient buffers are kept for reuse: a training step
// allocates the same sizes every step, and memory fresh from the OS costs a
// page fault per 4 KiB (about a quarter of a small CNN's step). Process-wide
// (a tensor may die on another thread than the one that made it), at most
// max_bytes held; sizes are matched exactly.
class buffer_cache {
 public:
  static constexpr std::size_t min_bytes = std::size_t(256) << 10;
  static constexpr std::size_t max_bytes = std::size_t(512) << 20;
  static constexpr std::align_val_t alignment{64};

  static buffer_cache& get() {
    static auto* cache = new buffer_cache;  // never destroyed: tensors in statics outlive it
    return *cache;
  }
  void* take(std::size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = free_.find(bytes);
    if (it == free_.end() || it->second.empty()) return nullptr;
    void* p = it->second.back();
    it->second.pop_back();
    held_ -= bytes;
    return p;
  }
  void give(void* p, std::size_t bytes) noexcept {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (held_ + bytes <= max_bytes) {
        try {
          free_[bytes].push_back(p);
          held_ += bytes;
          return;
        } catch (...) {  // no memory for the list entry: release the buffer instead
        }
      }
    }
    ::operator delete(p, alignment);
  }

 private:
  std::mutex mutex_;
  std::unordered_map<std::size_t, std::vector<void*>> free_;
  std::size_t held_ = 0;
};

template <class S>
std::shared_ptr<S> allocate_uninitialized(index n) {
  const std::size_t bytes = static_cast<std::size_t>(n) * sizeof(S);
  if (bytes < buffer_cache::min_bytes) {
    auto v = std::make_shared_for_overwrite<S[]>(static_cast<std::size_t>(n));
    return std::shared_ptr<S>(v, v.get());
  }
  void* p = buffer_cache::get().take(bytes);
  if (p == nullptr) p = ::operator new(bytes, buffer_cache::alignment);
  return std::shared_ptr<S>(static_cast<S*>(p),
                            [bytes](S* q) { buffer_cache::get().give(q, bytes); });
}

template <class S>
std::shared_ptr<S> allocate(index n) {
  auto p = allocate_uninitialized<S>(n);
  std::fill_n(p.get(), n, S(0));
  return p;
}

template <class S>
node<S>::~node() {
  // Destroying a chain of shared_ptr nodes recursively would use one stack
  // frame per node. Instead take over the inputs of every node about to die
  // (use_count() == 1: we hold the last reference) before releasing it, so
  // each node dies with no inputs left and the loop does all the work.
  std::vector<std::shared_ptr<node>> doomed = std::move(inputs);
  while (!doomed.empty()) {
    std::shared_ptr<node> n = std::move(doomed.back());
    doomed.pop_back();
    if (n.use_count() == 1) {
      for (auto& in : n->inputs) doomed.push_back(std::move(in));
      n->inputs.clear();
      n->backward = nullptr;
    }
  }
}

template <class S>
matrix_map<S> node<S>::grad_map() {
  if (!grad) grad = make_grad ? make_grad() : allocate<S>(dims.numel());
  return {grad.get(), rows(), cols()};
}

template <class S>
void node<S>::materialize() const {
  // Nodes live in shared_ptrs and are never const objects: making a released
  // value is not a change a reader can see.
  auto& self = const_cast<node&>(*this);
  self.value = make_value();
  if (!self.value) {
    throw usage_error(
        fmt::format("ad: parameter '{}': its released value could not be made", name));
  }
}

}  // namespace detail

// ---------------------------------------------------------------------------
// basic_tensor

namespace {
template <class S>
basic_tensor<S> make_leaf(const shape& s, bool requires_grad) {
  auto n = std::make_shared<detail::node<S>>();
  n->dims = s;
  n->value = detail::allocate<S>(s.numel());
  n->requires_grad = requires_grad;
  return basic_tensor<S>(std::move(n));
}
}  // namespace

template <class S>
basic_tensor<S> basic_tensor<S>::zeros(ad::shape s, bool requires_grad) {
  return make_leaf<S>(s, requires_grad);
}

template <class S>
basic_tensor<S> basic_tensor<S>::full(ad::shape s, S value, bool requires_grad) {
  auto t = make_leaf<S>(s, requires_grad);
  t.value().setConstant(value);
  return t;
}

template <class S>
basic_tensor<S> basic_tensor<S>::scalar(S value, bool requires_grad) {
  return full(ad::shape{}, value, requires_grad);
}

template <class S>
basic_tensor<S> basic_tensor<S>::from_vector(std::vector<S> values, ad::shape s,
                                             bool requires_grad) {
  if (static_cast<index>(values.size()) != s.numel()) {
    throw usage_error(fmt::format(
        "ad::tensor::from_vector: {} values given for shape {} ({} elements); pass exactly "
        "rows*cols values in row-major order",
        values.size(), s.str(), s.numel()));
  }
  auto n = std::make_shared<detail::node<S>>();
  n->dims = s;
  auto v = std::make_shared<std::vector<S>>(std::move(values));
  n->value = std::shared_ptr<S>(v, v->data());
  n->requires_grad = requires_grad;
  return basic_tensor<S>(std::move(n));
}

template <class S>
basic_tensor<S> basic_tensor<S>::from_matrix(const matrix<S>& m, bool requires_grad) {
  auto t = make_leaf<S>(ad::shape{m.rows(), m.cols()}, requires_grad);
  t.value() = m;
  return t;
}

template <class S>
basic_tensor<S> basic_tensor<S>::from_data(const S* data, ad::shape s) {
  if (data == nullptr && s.numel() > 0) {
    throw usage_error("ad::tensor::from_data: null data pointer for shape " + s.str());
  }
  auto n = std::make_shared<detail::node<S>>();
  n->dims = s;
  // Borrowed: a no-op deleter; ops only read values, so the const_cast is safe.
  n->value = std::shared_ptr<S>(const_cast<S*>(data), [](S*) {});
  return basic_tensor<S>(std::move(n));
}

template <class S>
basic_tensor<S> basic_tensor<S>::from_data(std::span<const S> data, ad::shape s) {
  if (static_cast<index>(data.size()) != s.numel()) {
    throw usage_error(fmt::format(
        "ad::tensor::from_data: {} values given for shape {} ({} elements); pass exactly "
        "rows*cols values in row-major order",
        data.size(), s.str(), s.numel()));
  }
  return from_data(data.data(), s);
}

template <class S>
detail::node<S>& basic_tensor<S>::checked() const {
  if (!node_) {
    throw usage_error(
        "ad::tensor: empty (default-constructed) tensor used; assign the result of an op or "
        "a factory such as ad::tensor::zeros first");
  }
  return *node_;
}

template <class S>
std::span<S> basic_tensor<S>::data() const {
  auto& n = checked();
  return {n.value_ptr(), static_cast<std::size_t>(n.dims.numel())};
}

template <class S>
std::span<S> basic_tensor<S>::grad_data() const {
  auto g = grad();
  return {g.data(), static_cast<std::size_t>(g.size())};
}

template <class S>
S basic_tensor<S>::item() const {
  auto& n = checked();
  if (n.dims.numel() != 1) {
    throw usage_error(
        fmt::format("ad::tensor::item: tensor has shape {} ({} elements); item() needs exactly one "
                    "element (reduce with ad::sum or ad::mean first)",
                    n.dims.str(), n.dims.numel()));
  }
  return *n.value_ptr();
}

template <class S>
basic_tensor<S>& basic_tensor<S>::set_requires_grad(bool on) {
  auto& n = checked();
  if (!n.is_leaf()) {
    throw usage_error(fmt::format(
        "ad::tensor::set_requires_grad: '{}' is the result of an op; only leaves can be marked "
        "(use detach() to make a leaf)",
        n.op));
  }
  n.requires_grad = on;
  return *this;
}

template <class S>
std::string basic_tensor<S>::name() const {
  auto& n = checked();
  return n.name.empty() ? std::string(n.op) : n.name;
}

template <class S>
void basic_tensor<S>::zero_grad() const {
  auto& n = checked();
  if (n.grad) grad().setZero();
  if (n.sparse) n.sparse->clear();
}

template <class S>
basic_tensor<S> basic_tensor<S>::detach() const {
  auto& n = checked();
  auto d = std::make_shared<detail::node<S>>();
  d->dims = n.dims;
  n.value_ptr();
  d->value = n.value;
  return basic_tensor<S>(std::move(d));
}

template <class S>
weight_grad_pass<S> basic_tensor<S>::backward(backward_options opts) const {
  return ad::backward(*this, opts);
}

template <class S>
void basic_tensor<S>::set_grad_ready_hook(std::function<void(const basic_tensor&)> hook) const {
  auto& n = checked();
  if (!hook) {
    n.grad_ready = nullptr;
    return;
  }
  n.grad_ready = [hook = std::move(hook)](detail::node<S>& self) {
    hook(basic_tensor<S>(self.shared_from_this()));
  };
}

// ---------------------------------------------------------------------------
// backward

template <class S>
void weight_grad_pass<S>::add(std::shared_ptr<detail::node<S>> consumer, std::size_t input) {
  ++remaining_[consumer->inputs[input].get()];
  edges_.emplace_back(std::move(consumer), input);
}

template <class S>
weight_grad_pass<S>::~weight_grad_pass() {
  if (edges_.empty()) return;
  try {
    log::warn(
        "ad::weight_grad_pass dropped with {} deferred parameter gradient(s) never run; "
        "call run() (or ad::run_weight_grads) after a backward with defer_weight_grads",
        edges_.size());
  } catch (...) {  // destructors never throw
  }
}

template <class S>
void weight_grad_pass<S>::run() {
  // Edges were recorded in reverse topological order (last layer first), so
  // hooks fire in the order a data-parallel trainer wants to start allreduce.
  auto edges = std::move(edges_);
  auto remaining = std::move(remaining_);
  edges_.clear();
  remaining_.clear();
  for (auto& [consumer, i] : edges) {
    for (auto& in : consumer->inputs) in->value_ptr();  // released parameter values are made
    consumer->backward(*consumer, i);
    detail::node<S>* param = consumer->inputs[i].get();
    if (--remaining[param] == 0 && param->grad_ready) param->grad_ready(*param);
  }
  for (auto& [consumer, i] : edges) consumer->grad.reset();
}

namespace {

template <class S>
weight_grad_pass<S> run_backward(const basic_tensor<S>& root_tensor, const matrix<S>* seed,
                                 backward_options opts) {
  if (!root_tensor.defined()) {
    throw usage_error("ad::backward: empty (default-constructed) tensor; pass a loss");
  }
  detail::node<S>* root = root_tensor.node().get();
  if (!root->requires_grad) {
    throw usage_error(fmt::format(
        "ad::backward: '{}' does not require grad: it was computed inside ad::no_grad or from "
        "inputs none of which requires grad (mark leaves with set_requires_grad())",
        root_tensor.name()));
  }
  if (seed == nullptr && root->dims.numel() != 1) {
    throw usage_error(fmt::format(
        "ad::backward: the root has shape {}; backward without a gradient needs a one-element "
        "loss (reduce with ad::sum or ad::mean) or pass grad_output",
        root->dims.str()));
  }

  // Pass 1 (iterative DFS): find the nodes that need a gradient and count,
  // per node, the edges from consumers still to run (its pending count).
  const std::uint64_t mark = ++backward_epoch;
  std::vector<detail::node<S>*> stack{root};
  root->mark = mark;
  root->pending = 0;
  while (!stack.empty()) {
    detail::node<S>* n = stack.back();
    stack.pop_back();
    if (!n->is_leaf()) n->grad.reset();  // interior gradients restart; leaves accumulate
    for (auto& in : n->inputs) {
      if (!in->requires_grad) continue;
      if (in->mark != mark) {
        in->mark = mark;
        in->pending = 0;
        stack.push_back(in.get());
      }
      ++in->pending;
    }
  }

  if (seed != nullptr) {
    root->grad_map() += *seed;
  } else {
    root->grad_map().array() += S(1);
  }

  // Pass 2 (Kahn): a node is ready once every consumer has contributed, so
  // its gradient is final when it is popped; leaves fire their hook then.
  weight_grad_pass<S> pass;
  std::vector<detail::node<S>*> ready{root};
  while (!ready.empty()) {
    detail::node<S>* n = ready.back();
    ready.pop_back();
    if (n->is_leaf()) {
      if (n->grad_ready) n->grad_ready(*n);
      continue;
    }
    n->grad_map();
    // A released parameter value (ZeRO stage 3) is made before the closures
    // read it.
    for (auto& in : n->inputs) in->value_ptr();
    bool deferred = false;
    for (std::size_t i = 0; i < n->inputs.size(); ++i) {
      detail::node<S>* in = n->inputs[i].get();
      if (!in->requires_grad) continue;
      if (opts.defer_weight_grads && in->is_parameter) {
        pass.add(n->shared_from_this(), i);
        deferred = true;
        continue;
      }
      n->backward(*n, i);
      if (--in->pending == 0) ready.push_back(in);
    }
    if (!deferred) n->grad.reset();  // no longer needed: free it early
  }
  return pass;
}

}  // namespace

template <class S>
weight_grad_pass<S> backward(const basic_tensor<S>& root, backward_options opts) {
  return run_backward<S>(root, nullptr, opts);
}

template <class S>
weight_grad_pass<S> backward(const basic_tensor<S>& root, const basic_tensor<S>& grad_output,
                             backward_options opts) {
  if (!root.defined() || !grad_output.defined()) {
    throw usage_error("ad::backward: empty tensor passed as root or grad_output");
  }
  if (root.rows() != grad_output.rows() || root.cols() != grad_output.cols()) {
    throw usage_error(fmt::format(
        "ad::backward: grad_output has shape {} but the root has shape {}; they must match",
        grad_output.shape().str(), root.shape().str()));
  }
  const matrix<S> seed = grad_output.value();
  return run_backward<S>(root, &seed, opts);
}

#define RINGFLOW_AD_INSTANTIATE(S)                                                         \
  template std::shared_ptr<S> detail::allocate<S>(index);                                  \
  template std::shared_ptr<S> detail::allocate_uninitialized<S>(index);                    \
  template struct detail::node<S>;                                                         \
  template class basic_tensor<S>;                                                          \
  template class weight_grad_pass<S>;                                                      \
  template weight_grad_pass<S> backward<S>(const basic_tensor<S>&, backward_options);      \
  template weight_grad_pass<S> backward<S>(const basic_tensor<S>&, const basic_tensor<S>&, \
                                           backward_options);
RINGFLOW_AD_INSTANTIATE(float)
RINGFLOW_AD_INSTANTIATE(double)
#undef RINGFLOW_AD_INSTANTIATE

}  // namespace ringflow::ad
