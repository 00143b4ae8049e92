// Consumer of ringflow::coll alone: 3 thread ranks allreduce, without Eigen
// (or anything of the training half) on the include path.
#include <cstdio>
#include <span>
#include <vector>

#include <ringflow/backends/local.hpp>
#include <ringflow/coll/collectives.hpp>

#if __has_include(<Eigen/Core>)
#error "ringflow::coll put Eigen on the include path"
#endif

int main() {
  constexpr int ranks = 3;
  int wrong = -1;
  try {
    ringflow::local::run(ranks, [&](ringflow::communicator& c) {
      std::vector<double> x(100, static_cast<double>(c.rank() + 1));
      ringflow::allreduce(c, std::span(x), ringflow::sum);
      int bad = 0;
      for (double v : x) bad += v != 6.0 ? 1 : 0;
      if (c.rank() == 0) wrong = bad;
    });
  } catch (const ringflow::error& e) {
    std::fprintf(stderr, "ringflow coll consumer: error: %s\n", e.what());
    return 1;
  }
  if (wrong != 0) {
    std::fprintf(stderr, "ringflow coll consumer: %d wrong elements\n", wrong);
    return 1;
  }
  std::printf("ringflow coll consumer: OK (%d ranks)\n", ranks);
  return 0;
}
