// data_parallel with a sparse ad::embedding table over MPI (mpirun -np 1..5):
// sparse_allreduce of the table's rows gives the same parameters as dense
// reduction (bitwise when no row is summed over more than two ranks, else to
// 1e-6 relative), identical on every rank.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "ringflow/backends/mpi.hpp"
#include "ringflow/coll/collectives.hpp"
#include "support/catch.hpp"
#include "support/embedding_training.hpp"

using namespace ringflow;
using testing::id_overlap;

namespace {
// Every rank's `v` equals rank 0's, bit for bit (agreed on all ranks).
bool same_everywhere(const communicator& comm, std::vector<float> v) {
  std::vector<float> root = v;
  broadcast(comm, std::span<float>(root), 0);
  int same = std::memcmp(root.data(), v.data(), v.size() * sizeof(float)) == 0 ? 1 : 0;
  allreduce(comm, std::span<int>(&same, 1), min);
  return same == 1;
}
}  // namespace

TEST_CASE("mpi: sparse embedding reduction equals dense reduction", "[mpi][embedding]") {
  auto comm = mpi::world();
  const int n = comm.size();
  for (const auto overlap : {id_overlap::pairs, id_overlap::all}) {
    INFO("ranks " << n << " overlap " << (overlap == id_overlap::pairs ? "pairs" : "all"));
    const auto sparse = testing::train_embedding_model(comm, true, 6, overlap, n - 1);
    const auto dense = testing::train_embedding_model(comm, false, 6, overlap, n - 1);
    CHECK(same_everywhere(comm, sparse.values));
    CHECK(same_everywhere(comm, dense.values));
    REQUIRE(sparse.values.size() == dense.values.size());
    if (overlap == id_overlap::pairs || n <= 2) {
      CHECK(std::memcmp(sparse.values.data(), dense.values.data(),
                        sparse.values.size() * sizeof(float)) == 0);
      CHECK(sparse.losses == dense.losses);
    } else {
      double worst = 0;
      for (std::size_t i = 0; i < sparse.values.size(); ++i) {
        const double a = sparse.values[i], b = dense.values[i];
        worst = std::max(worst, std::abs(a - b) / (1.0 + std::abs(b)));
      }
      INFO("largest relative difference " << worst);
      CHECK(worst <= 1e-6);
    }
    if (n > 1) {
      CHECK(sparse.bytes_sent < dense.bytes_sent);
    } else {
      CHECK(sparse.bytes_sent == 0);
    }
  }
}
