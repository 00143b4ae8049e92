// allreduce_hello: MPI ranks allreduce their values (sum, avg); rank 0 prints and checks them.
#include <cstddef>
#include <cstdio>
#include <span>
#include <vector>

#include <ringflow/ringflow.hpp>

int main(int argc, char** argv) {
  ringflow::mpi::environment env(argc, argv);  // MPI_Init ... MPI_Finalize
  auto comm = ringflow::mpi::world();          // all ranks, over MPI
  const int rank = comm.rank(), size = comm.size();

  // Rank r holds r + 1 + i in slot i; think of them as its gradients.
  constexpr int n = 8;
  std::vector<float> sum(n), avg(n);
  for (int i = 0; i < n; ++i) sum[i] = avg[i] = static_cast<float>(rank + 1 + i);

  ringflow::allreduce(comm, std::span(sum), ringflow::sum);
  ringflow::allreduce(comm, std::span(avg), ringflow::avg, ringflow::algo::ring);

  // sum over r of (r + 1 + i) = size(size+1)/2 + size*i; avg = that / size.
  int ok = 1;
  for (int i = 0; i < n; ++i) {
    const float s = static_cast<float>(size * (size + 1) / 2 + size * i);
    ok &= (sum[i] == s && avg[i] == s / static_cast<float>(size)) ? 1 : 0;
  }

  // Gather (first sum, first avg, ok) from every rank so rank 0 prints in rank order.
  std::vector<float> mine{sum[0], avg[0], static_cast<float>(ok)};
  std::vector<float> all(3 * static_cast<std::size_t>(size));
  ringflow::allgather(comm, std::span<const float>(mine), std::span(all));
  std::vector<int> all_ok{ok};
  ringflow::allreduce(comm, std::span(all_ok), ringflow::min);

  if (rank == 0) {
    for (int r = 0; r < size; ++r) {
      std::printf("rank %d/%d: sum[0] = %g  avg[0] = %g  %s\n", r, size, all[3 * r], all[3 * r + 1],
                  all[3 * r + 2] == 1.0f ? "ok" : "WRONG");
    }
    std::printf("allreduce_hello: %d rank(s), sum and avg of %d floats: %s\n", size, n,
                all_ok[0] ? "verified" : "FAILED");
  }
  return all_ok[0] ? 0 : 1;
}
