// The registry of externally provided allreduce algorithms (algo::shm).
#include "ringflow/coll/registry.hpp"

#include <array>
#include <atomic>
#include <fmt/format.h>

#include "ringflow/core/error.hpp"

namespace ringflow::detail {

// Defined by the shm backend (src/backends/shm.cpp) in the same library.
// Calling it from here makes the linker keep that object file even in a
// static build where the program never includes backends/shm.hpp.
bool shm_register() noexcept;

namespace {
constexpr std::size_t slots = std::size(all_algos);
std::array<std::atomic<allreduce_fn>, slots>& table() {
  static std::array<std::atomic<allreduce_fn>, slots> t{};
  return t;
}
}  // namespace

void register_algorithm(algo a, allreduce_fn fn) {
  const auto i = static_cast<std::size_t>(a);
  if (i >= slots || a == algo::automatic) {
    throw usage_error(fmt::format("register_algorithm: '{}' cannot be registered", algo_name(a)));
  }
  table()[i].store(fn);
}

allreduce_fn registered_algorithm(algo a) noexcept {
  static const bool builtins = shm_register();
  (void)builtins;
  const auto i = static_cast<std::size_t>(a);
  return i < slots ? table()[i].load() : nullptr;
}

}  // namespace ringflow::detail
