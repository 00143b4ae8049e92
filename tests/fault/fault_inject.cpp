// fault_inject: a loop of allreduces in which one rank misbehaves on purpose
// (stops, dies, throws, skips a call, or calls with another op, count or
// dtype), so run_faults.sh can check that every rank of the job ends, soon,
// with an error that names the problem.
//
//   mpirun -np 3 fault_inject <case> <algo> [victim]
//   case: none stop kill throw skip op count count0 dtype
#include <signal.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include <ringflow/ringflow.hpp>

namespace rf = ringflow;

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: fault_inject <case> <algo> [victim]\n");
    return 2;
  }
  const std::string_view what = argv[1];
  rf::mpi::environment env(argc, argv);
  auto comm = rf::mpi::world();
  const rf::algo algorithm = rf::parse_algo(argv[2]);
  const int victim = argc > 3 ? std::atoi(argv[3]) : 1;
  const bool me = comm.rank() == victim;
  constexpr int iterations = 40, faulty = 20;
  constexpr std::size_t n = 1000;
  try {
    std::vector<float> g(n);
    for (int it = 0; it < iterations; ++it) {
      for (std::size_t i = 0; i < n; ++i) g[i] = static_cast<float>(comm.rank() + 1);
      if (me && it == faulty) {
        if (what == "stop") raise(SIGSTOP);
        if (what == "kill") raise(SIGKILL);
        if (what == "throw") throw std::runtime_error("fault_inject: injected failure");
        if (what == "skip") continue;
        if (what == "op") {
          rf::allreduce(comm, std::span(g), rf::max, algorithm);
          continue;
        }
        if (what == "count" || what == "count0") {
          std::span<float> part(g.data(), what == "count" ? n - 1 : 0);
          rf::allreduce(comm, part, rf::sum, algorithm);
          continue;
        }
        if (what == "dtype") {
          std::vector<double> d(n, 1.0);
          rf::allreduce(comm, std::span(d), rf::sum, algorithm);
          continue;
        }
      }
      rf::allreduce(comm, std::span(g), rf::sum, algorithm);
      const float want = static_cast<float>(comm.size() * (comm.size() + 1) / 2);
      if (g[0] != want || g[n - 1] != want) {
        std::fprintf(stderr, "fault_inject: rank %d: WRONG result %g (want %g) at call %d\n",
                     comm.rank(), static_cast<double>(g[0]), static_cast<double>(want), it);
        return 3;
      }
    }
  } catch (const std::exception& e) {
    // As a user's trainer would: report and return, letting the environment
    // end MPI (which must not wait forever for ranks that are stuck).
    std::fprintf(stderr, "fault_inject: rank %d: %s\n", comm.rank(), e.what());
    return 1;
  }
  if (comm.rank() == 0) std::printf("fault_inject: %s/%s: all calls done\n", argv[1], argv[2]);
  return 0;
}
