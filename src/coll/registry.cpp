// The registry of allreduce algorithms that backends provide (algo::shm).
#include "ringflow/coll/registry.hpp"

#include <fmt/format.h>

#include <array>
#include <atomic>
#include <memory>
#include <mutex>
#include <vector>

#include "ringflow/core/error.hpp"

namespace ringflow::ext {
namespace {

struct entry {
  allreduce_fn run = nullptr;
  allreduce_cost_fn cost = nullptr;
};

constexpr std::size_t slots = algo_count;

// Readers take one atomic load of an immutable entry; writers (rare: a
// backend at start-up, tests) replace it under a mutex and keep every entry
// they made alive, so a reader's pointer never dangles.
struct table {
  std::array<std::atomic<const entry*>, slots> current{};
  std::mutex mutex;
  std::vector<std::unique_ptr<entry>> made;
};

table& the_table() {
  static table t;
  return t;
}

const entry* lookup(algo a) noexcept {
  const auto i = static_cast<std::size_t>(a);
  return i < slots ? the_table().current[i].load(std::memory_order_acquire) : nullptr;
}

}  // namespace

void register_algorithm(algo a, allreduce_fn fn, allreduce_cost_fn cost) {
  const auto i = static_cast<std::size_t>(a);
  if (i >= slots || a == algo::automatic) {
    throw usage_error(fmt::format("register_algorithm: '{}' cannot be registered", algo_name(a)));
  }
  table& t = the_table();
  std::lock_guard lock(t.mutex);
  const entry* e = nullptr;
  if (fn != nullptr) {
    t.made.push_back(std::make_unique<entry>(entry{fn, cost}));
    e = t.made.back().get();
  }
  t.current[i].store(e, std::memory_order_release);
}

allreduce_fn registered_algorithm(algo a) noexcept {
  const entry* e = lookup(a);
  return e != nullptr ? e->run : nullptr;
}

allreduce_cost_fn registered_cost(algo a) noexcept {
  const entry* e = lookup(a);
  return e != nullptr ? e->cost : nullptr;
}

}  // namespace ringflow::ext
