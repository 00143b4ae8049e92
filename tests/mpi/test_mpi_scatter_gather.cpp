// reduce_scatter by recursive halving and allgather by recursive doubling
// over MPI (mpirun -np 1..5; 3 and 5 take the ring): sampled dtypes and ops
// at the interesting counts, in and out of place.
#include "ringflow/backends/mpi.hpp"
#include "support/catch.hpp"
#include "support/coll_checks.hpp"
#include "support/collect.hpp"

using namespace ringflow;
using ringflow::testing::failures;
using ringflow::testing::require_none;

namespace {
template <class T, class Op>
void scatter_gather(const communicator& c, const Op& op, failures& f) {
  for (std::size_t count : testing::interesting_counts(c.size())) {
    for (bool in_place : {false, true}) {
      testing::check_reduce_scatter<T>(c, count, op, in_place,
                                       coll_options{algo::halving_doubling, 0}, f);
      testing::check_allgather<T>(c, count, in_place, coll_options{algo::halving_doubling, 0}, f);
    }
  }
}
}  // namespace

TEST_CASE("mpi: recursive halving reduce_scatter and doubling allgather", "[mpi][scatter_gather]") {
  auto world = mpi::world();
  failures f;
  scatter_gather<float>(world, sum, f);
  scatter_gather<std::int32_t>(world, avg, f);
  scatter_gather<half>(world, max, f);
  scatter_gather<std::int64_t>(world, prod, f);
  testing::check_allgather<double>(world, 100003, false, coll_options{algo::recursive_doubling, 0},
                                   f);
  require_none(f);
}
