// The parameter-layout hash the trainers compare across ranks (private to src/train).
#pragma once

#include <cstdint>

#include "ringflow/ad/parameter_store.hpp"

namespace ringflow::train::detail {
/// FNV-1a over the parameter names and sizes.
std::uint64_t layout_hash(const ad::parameter_store<float>& params);
}  // namespace ringflow::train::detail
