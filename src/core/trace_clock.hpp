// The clock and file naming every Chrome trace of the library shares (train's
// timeline, the parameter server's), so traces of one run line up and land
// beside each other. Private to the compiled library, like core/json.hpp.
#pragma once

#include <filesystem>

namespace ringflow::detail::trace {

/// Microseconds on a monotonic clock offset to system time (the offset fixed
/// at first use in the process), so spans are monotonic within a process and
/// roughly aligned across processes on one host.
double now_us();

/// `path` with the rank inserted before the extension:
/// "trace.json" -> "trace.rank3.json", "out/trace" -> "out/trace.rank3.json".
std::filesystem::path rank_file(const std::filesystem::path& path, int rank);

}  // namespace ringflow::detail::trace
