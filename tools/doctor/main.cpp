// ringflow-doctor: reads the flight-recorder dumps of all ranks and prints
// which rank is behind, where the stuck ranks wait, and which disagree.
//
//   ringflow-doctor DIR-OR-FILE...
//
// Exit status: 0 no problem found, 1 a problem found, 2 bad usage or a dump
// that cannot be read (one line naming the file).
#include <cstdio>
#include <exception>
#include <string>
#include <string_view>
#include <vector>

#include "analysis.hpp"

namespace {
constexpr const char* usage =
    "usage: ringflow-doctor DIR-OR-FILE...\n"
    "  Reads ringflow flight-recorder dumps (ringflow-flight.<rank>.jsonl; a directory means all\n"
    "  of them in it) and prints, per communicator, each rank's last completed collective, what\n"
    "  it is in and waits on, which ranks are behind and which called different collectives.\n"
    "  Exit status: 0 no problem found, 1 problem found, 2 bad input.\n"
    "  Dumps are written on a failure, on SIGTERM/SIGUSR1 and by ringflow::flight::dump()\n"
    "  (see docs/diagnostics.md).\n";
}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> args;
  for (int i = 1; i < argc; ++i) {
    const std::string_view a(argv[i]);
    if (a == "-h" || a == "--help") {
      std::fputs(usage, stdout);
      return 0;
    }
    if (!a.empty() && a[0] == '-') {
      std::fprintf(stderr, "ringflow-doctor: unknown option '%s' (see --help)\n", argv[i]);
      return 2;
    }
    args.emplace_back(a);
  }
  if (args.empty()) {
    std::fputs(usage, stderr);
    return 2;
  }
  try {
    const auto paths = ringflow::doctor::expand_paths(args);
    std::vector<ringflow::doctor::dump> dumps;
    for (std::size_t i = 0; i < paths.size(); ++i) {
      dumps.push_back(ringflow::doctor::load_dump(paths[i], i));
    }
    const auto rep = ringflow::doctor::diagnose(dumps);
    std::fputs(ringflow::doctor::render(rep, dumps).c_str(), stdout);
    return rep.problem ? 1 : 0;
  } catch (const ringflow::doctor::load_error& e) {
    std::fprintf(stderr, "ringflow-doctor: %s\n", e.what());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "ringflow-doctor: %s\n", e.what());
    return 2;
  }
}
