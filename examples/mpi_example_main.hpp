// The main() of the MPI examples that run the same job on every rank
// (train_fashion_mnist, distill_fashion_mnist): flags, --help, the run, and
// its errors reported once.
#pragma once

#include <cstdio>
#include <exception>

#include "tool_flags.hpp"
#include <ringflow/backends/mpi.hpp>
#include <ringflow/core/log.hpp>

namespace ringflow::examples {

/// Starts MPI, parses the flags with parse(argc, argv) (an optional of the
/// options: empty for --help, which help() prints on rank 0; a bad flag is
/// reported by rank 0 and every rank exits with tool_flags::bad_flag_status),
/// then returns run(options, world). An exception from run ends the process
/// with 1; the errors are the same on every rank (data files, checkpoints,
/// flags), so rank 0 prints it and the others log it at info level
/// (RINGFLOW_LOG_LEVEL=info shows every rank's).
template <class Parse, class Help, class Run>
int mpi_example_main(int argc, char** argv, const char* name, Parse parse, Help help, Run run) {
  ringflow::mpi::environment env(argc, argv);
  auto comm = ringflow::mpi::world();
  decltype(parse(argc, argv)) o;
  try {
    o = parse(argc, argv);
  } catch (const tool_flags::bad_flag& e) {
    return comm.rank() == 0 ? tool_flags::report(name, e) : tool_flags::bad_flag_status;
  }
  if (!o) {
    if (comm.rank() == 0) help();
    return 0;
  }
  try {
    return run(*o, comm);
  } catch (const std::exception& e) {
    if (comm.rank() == 0) {
      std::fprintf(stderr, "\n%s: %s\n", name, e.what());
    } else {
      ringflow::log::info("{} (rank {}): {}", name, comm.rank(), e.what());
    }
    return 1;
  }
}

}  // namespace ringflow::examples
