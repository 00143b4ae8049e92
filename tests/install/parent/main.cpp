// Four thread-ranks allreduce through ringflow built as a subproject.
#include <cstdio>
#include <vector>

#include "ringflow/backends/local.hpp"
#include "ringflow/coll/collectives.hpp"

int main() {
  std::vector<int> wrong(4, 0);
  ringflow::local::run(4, [&](ringflow::communicator& c) {
    std::vector<float> x(1000, static_cast<float>(c.rank() + 1));
    ringflow::allreduce(c, std::span(x), ringflow::sum);
    for (float v : x) wrong[static_cast<std::size_t>(c.rank())] += v != 10.0f;
  });
  int total = 0;
  for (int w : wrong) total += w;
  std::printf("add_subdirectory parent: %s\n", total == 0 ? "ok" : "WRONG");
  return total == 0 ? 0 : 1;
}
