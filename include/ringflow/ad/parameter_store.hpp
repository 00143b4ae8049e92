// Named parameters packed into one contiguous value buffer and one gradient
// buffer, so a trainer can allreduce every gradient in place without copies.
#pragma once

#include <cstddef>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "ringflow/ad/tensor.hpp"

namespace ringflow::ad {

/// Where one parameter lives inside its store.
template <class S>
struct parameter_info {
  std::string name;        ///< e.g. "0.weight"
  std::size_t offset = 0;  ///< first element in all_values() / all_grads()
  std::size_t size = 0;    ///< element count
  basic_tensor<S> tensor;  ///< the parameter (value/grad are views into the store)
};

/// A new parameter outside any store (own buffers): requires_grad, named.
/// Modules create these; parameter_store::pack moves them into one buffer.
template <class S>
basic_tensor<S> make_parameter(std::string name, shape s);

/// Owns one std::vector for all parameter values and one for all gradients;
/// every parameter's value() and grad() are Eigen::Map views into them at
/// [offset, offset + size). A cheap handle: copies share the same store.
/// @code
///   auto params = model.parameters();
///   allreduce(comm, params.all_grads(), ringflow::avg);   // no copy
///   for (auto& p : params) fmt::print("{} {} {}\n", p.name, p.offset, p.size);
/// @endcode
template <class S>
class parameter_store {
 public:
  using hook_type = std::function<void(std::size_t index, const basic_tensor<S>& param)>;

  parameter_store();

  /// Appends a new zero parameter and returns it (re-packs the buffers).
  basic_tensor<S> add(std::string name, shape s);
  /// Makes `params` (in this order) the store's contents: values are copied
  /// into fresh contiguous buffers (gradients too) and every parameter's
  /// storage is re-pointed there. A parameter packed into another store later
  /// leaves this one stale (check_bound() then throws).
  void pack(const std::vector<std::pair<std::string, basic_tensor<S>>>& params);

  /// Number of parameters.
  std::size_t size() const;
  /// Total element count (the length of all_values() and all_grads() unless
  /// released).
  std::size_t numel() const;
  const parameter_info<S>& operator[](std::size_t i) const;
  /// The parameter called `name`; throws usage_error naming the known ones.
  const parameter_info<S>& at(std::string_view name) const;
  const parameter_info<S>* begin() const;
  const parameter_info<S>* end() const;

  /// Every parameter value, back to back, in parameter order (empty while
  /// the values are released).
  std::span<S> all_values() const;
  /// Every gradient, back to back; all_grads()[p.offset + k] IS p's grad element k.
  std::span<S> all_grads() const;
  /// Zeroes every gradient (with released gradients: frees them instead;
  /// the next backward starts each from zero).
  void zero_grad() const;

  /// Where a released parameter's gradient is placed: called with the
  /// parameter's index when a backward first needs its gradient; must return
  /// p.size zeros (which the node keeps until its grad is reset).
  using grad_allocator = std::function<std::shared_ptr<S>(std::size_t index)>;

  /// Releases the flat gradient buffer: each parameter's gradient is then
  /// allocated when a backward first reaches it (by `alloc`, or a buffer of
  /// its own when empty) and freed by whoever consumed it
  /// (train::sharded_data_parallel at stage 2 frees each bucket's gradients
  /// once reduced), so the store no longer holds numel() gradients at all
  /// times. all_grads() is then empty. Current gradients are dropped.
  /// pack_grads() (or pack()) undoes it.
  void release_grads(grad_allocator alloc = {}) const;
  /// Gives the store a flat gradient buffer again: zeros, with every
  /// parameter's current gradient (if it has one) copied in, and every
  /// parameter's grad() pointing into it. No-op when not released.
  void pack_grads() const;
  /// True after release_grads() (until pack_grads() or pack()).
  bool grads_released() const;

  /// Where a released parameter's value comes from: called with the
  /// parameter's index when it is read (an op's input, value(), data()) and
  /// its value is absent; returns p.size elements, which the node keeps until
  /// its value is reset (by whoever released it).
  using value_allocator = std::function<std::shared_ptr<S>(std::size_t index)>;

  /// Releases the flat value buffer (ZeRO stage 3: train::sharded_data_parallel
  /// keeps 1/p of the values and gathers the rest when read): every
  /// parameter's value is dropped and made by `alloc` on its next read.
  /// all_values() is then empty; numel() is unchanged. pack_values() (or
  /// pack()) undoes it.
  void release_values(value_allocator alloc) const;
  /// Gives the store a flat value buffer again, holding `values` (numel()
  /// elements, in parameter order), every parameter's value pointing into it.
  void pack_values(std::vector<S> values) const;
  /// True after release_values() (until pack_values() or pack()).
  bool values_released() const;

  /// Calls hook(index, param) during backward as soon as that parameter's
  /// gradient is final: exactly once per parameter reached by the backward,
  /// in the order gradients complete (typically last layer first).
  void set_grad_ready_hook(hook_type hook) const;

  /// Throws usage_error if a parameter was re-packed into another store
  /// (say, after its module was added to a bigger model).
  void check_bound() const;

  /// True when the two handles share one store.
  bool same_store(const parameter_store& other) const { return state_ == other.state_; }

 private:
  struct state;
  std::shared_ptr<state> state_;
};

extern template class parameter_store<float>;
extern template class parameter_store<double>;

}  // namespace ringflow::ad
