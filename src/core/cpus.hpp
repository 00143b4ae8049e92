// Which CPUs this process may run on: the one probe behind "how many cores
// do this node's ranks share" (the cost model's cluster shape, in
// coll/context.cpp, and the MPI backend's spin-or-yield choice, in
// backends/mpi.cpp). Each takes the union over a node's ranks through its
// own exchange; both count the same thing from the same bits. Private to the
// compiled library.
#pragma once

#include <array>
#include <cstdint>

namespace ringflow::detail {

/// The first 1024 CPUs as a bit set; trivially copyable, so it travels in
/// an exchange as 128 bytes.
struct cpu_mask {
  std::array<std::uint64_t, 16> bits{};

  /// How many CPUs are set.
  int count() const noexcept;
  /// Adds the CPUs of `other` (the union of two ranks' sets).
  void merge(const cpu_mask& other) noexcept;
};

/// The CPUs this process may run on (sched_getaffinity: what taskset, a
/// container or the launcher's binding left), or the first
/// hardware_concurrency() CPUs when the affinity cannot be read.
cpu_mask process_cpus() noexcept;

}  // namespace ringflow::detail
