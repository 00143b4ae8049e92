// Pruning: global magnitude pruning of an ad model's weight matrices (with a
// mask to keep them pruned while fine-tuning), and structured pruning that
// removes whole hidden neurons, so the layers really shrink.
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "ringflow/ad/parameter_store.hpp"
#include "ringflow/serve/model.hpp"

namespace ringflow::serve {

/// Which weights stay after pruning: a 0/1 mask per weight matrix (the
/// rank-2 parameters named "*.weight"; biases are never pruned).
/// @code
///   auto params = net.parameters();
///   auto mask = serve::prune_global_magnitude(params, 0.8);
///   for (...) { /* forward, backward */ opt.step(); mask.apply(params); }   // fine-tune
/// @endcode
class pruning_mask {
 public:
  /// Zeroes the pruned weights of `params` (the store the mask was made
  /// from, or one of the same layout; else usage_error).
  void apply(const ad::parameter_store<float>& params) const;
  /// Pruned weights over all masked weights.
  double sparsity() const noexcept;
  /// (parameter name, keep[i]) per masked parameter.
  const std::vector<std::pair<std::string, std::vector<std::uint8_t>>>& masks() const noexcept {
    return masks_;
  }

 private:
  friend pruning_mask prune_global_magnitude(const ad::parameter_store<float>&, double);
  std::vector<std::pair<std::string, std::vector<std::uint8_t>>> masks_;
};

/// Zeroes the `sparsity` fraction (in [0, 1)) of all weight-matrix entries
/// of the model with the smallest magnitude, one threshold over the whole
/// model (so layers lose different shares), and returns the mask.
pruning_mask prune_global_magnitude(const ad::parameter_store<float>& params, double sparsity);

/// Structured pruning of an fp32 model: each hidden layer keeps the
/// `keep_fraction` of its neurons (at least one) with the largest
/// importance ||incoming weights and bias|| * ||outgoing weights||, in their
/// original order; the next layer loses the matching rows. The model's
/// inputs and outputs are unchanged, the hidden widths shrink.
model prune_neurons(const model& fp32, double keep_fraction);

}  // namespace ringflow::serve
