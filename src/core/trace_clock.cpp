// The shared trace clock (steady clock offset to system time) and per-rank trace file names.
#include "core/trace_clock.hpp"

#include <fmt/format.h>

#include <chrono>
#include <string>

namespace ringflow::detail::trace {

namespace {

double clock_offset_us() {
  static const double offset = [] {
    const auto sys = std::chrono::duration<double, std::micro>(
                         std::chrono::system_clock::now().time_since_epoch())
                         .count();
    const auto steady = std::chrono::duration<double, std::micro>(
                            std::chrono::steady_clock::now().time_since_epoch())
                            .count();
    return sys - steady;
  }();
  return offset;
}

}  // namespace

double now_us() {
  return std::chrono::duration<double, std::micro>(
             std::chrono::steady_clock::now().time_since_epoch())
             .count() +
         clock_offset_us();
}

std::filesystem::path rank_file(const std::filesystem::path& path, int rank) {
  std::filesystem::path out = path;
  const std::string ext = path.has_extension() ? path.extension().string() : ".json";
  out.replace_filename(fmt::format("{}.rank{}{}", path.stem().string(), rank, ext));
  return out;
}

}  // namespace ringflow::detail::trace
