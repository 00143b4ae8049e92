// How a buffer of `count` elements is cut into one piece per rank.
#pragma once

#include <cstddef>

namespace ringflow {

/// A contiguous piece of a buffer, in elements.
struct chunk {
  std::size_t offset = 0;
  std::size_t count = 0;
};

/// Balanced partition of `count` elements into `parts` pieces: the first
/// count % parts pieces get one element more. reduce_scatter leaves piece
/// `rank` on each rank; allgather expects piece `rank` from each rank.
constexpr chunk partition(std::size_t count, int parts, int index) {
  const auto p = static_cast<std::size_t>(parts);
  const auto i = static_cast<std::size_t>(index);
  const std::size_t base = count / p;
  const std::size_t extra = count % p;
  return {i * base + (i < extra ? i : extra), base + (i < extra ? 1 : 0)};
}

}  // namespace ringflow
