// The CPU-set probe (cpus.hpp).
#include "cpus.hpp"

#include <sched.h>

#include <bit>
#include <thread>

namespace ringflow::detail {

int cpu_mask::count() const noexcept {
  int n = 0;
  for (std::uint64_t w : bits) n += std::popcount(w);
  return n;
}

void cpu_mask::merge(const cpu_mask& other) noexcept {
  for (std::size_t w = 0; w < bits.size(); ++w) bits[w] |= other.bits[w];
}

cpu_mask process_cpus() noexcept {
  constexpr int limit = 64 * 16;
  cpu_mask m;
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof set, &set) == 0) {
    for (int c = 0; c < CPU_SETSIZE && c < limit; ++c) {
      if (CPU_ISSET(c, &set))
        m.bits[static_cast<std::size_t>(c / 64)] |= std::uint64_t{1} << (c % 64);
    }
    return m;
  }
  const int n = static_cast<int>(std::thread::hardware_concurrency());
  for (int c = 0; c < n && c < limit; ++c) {
    m.bits[static_cast<std::size_t>(c / 64)] |= std::uint64_t{1} << (c % 64);
  }
  return m;
}

}  // namespace ringflow::detail
