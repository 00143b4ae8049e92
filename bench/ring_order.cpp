// ringflow-bench --ring-order: identity, reverse or a seeded random permutation of the ranks.
#include "ring_order.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <numeric>
#include <random>

#include "cli.hpp"

namespace ringflow::bench {

namespace {
constexpr const char* kRandom = "random:";
}

void check_ring_order(const std::string& spec) {
  if (spec == "identity" || spec == "reverse") return;
  if (spec.rfind(kRandom, 0) == 0) {
    const std::string seed = spec.substr(std::char_traits<char>::length(kRandom));
    if (!seed.empty() && seed.size() <= 18 &&
        std::all_of(seed.begin(), seed.end(), [](char c) { return c >= '0' && c <= '9'; })) {
      return;
    }
  }
  throw bad_flag(fmt::format(
      "--ring-order '{}': use identity, reverse or random:SEED (SEED a non-negative integer)",
      spec));
}

std::vector<int> ring_order(const std::string& spec, int nranks) {
  check_ring_order(spec);
  std::vector<int> order(static_cast<std::size_t>(nranks));
  std::iota(order.begin(), order.end(), 0);
  if (spec == "reverse") {
    std::reverse(order.begin(), order.end());
  } else if (spec != "identity") {
    // mt19937_64 and a hand-written Fisher-Yates: the same permutation on
    // every rank and every standard library (std::shuffle's is unspecified).
    std::mt19937_64 gen(std::stoull(spec.substr(std::char_traits<char>::length(kRandom))));
    for (std::size_t i = order.size(); i > 1; --i) {
      const std::size_t j = static_cast<std::size_t>(gen() % i);
      std::swap(order[i - 1], order[j]);
    }
  }
  return order;
}

MPI_Comm permuted_comm(MPI_Comm world, const std::string& spec) {
  int rank = 0, size = 0;
  MPI_Comm_rank(world, &rank);
  MPI_Comm_size(world, &size);
  const std::vector<int> order = ring_order(spec, size);
  const auto pos = std::find(order.begin(), order.end(), rank) - order.begin();
  MPI_Comm out = MPI_COMM_NULL;
  MPI_Comm_split(world, 0, static_cast<int>(pos), &out);  // key = position: rank i is order[i]
  return out;
}

std::string describe_ring_order(const std::string& spec, int nranks) {
  return fmt::format("{}: world ranks {}", spec, fmt::join(ring_order(spec, nranks), " "));
}

}  // namespace ringflow::bench
