// What a trainer holds per rank: bytes of parameters, gradients and optimizer state.
#pragma once

#include <cstddef>

#include "ringflow/train/checkpoint.hpp"

namespace ringflow::train {

/// Model-state bytes one rank holds at a moment (see docs/training.md,
/// "Sharded data parallel", for what each stage counts where).
struct memory_stats {
  std::size_t parameter_bytes = 0;        ///< parameter values (model, plus the shard's copy)
  std::size_t gradient_bytes = 0;         ///< gradient buffers the trainer keeps
  std::size_t optimizer_state_bytes = 0;  ///< the optimizer's buffers (moments, velocity)
  std::size_t total() const { return parameter_bytes + gradient_bytes + optimizer_state_bytes; }
};

/// Bytes of an optimizer's state buffers (AdamW: m and v; SGD: the momentum
/// buffer, empty without momentum), read through optimizer_state_of().
template <class Optimizer>
std::size_t optimizer_state_bytes(Optimizer& opt) {
  std::size_t bytes = 0;
  for (const auto& [name, buf] : optimizer_state_of(opt).buffers) bytes += buf.size_bytes();
  return bytes;
}

}  // namespace ringflow::train
