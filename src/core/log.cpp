// Logging backend: level from RINGFLOW_LOG_LEVEL, one mutex-guarded stderr sink.
#include "ringflow/core/log.hpp"

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <string>

#include "ringflow/core/env.hpp"
#include "ringflow/core/error.hpp"

namespace ringflow::log {
namespace {

level initial_level() {
  // Not env::report's warning: the log is not ready while its level is read.
  const auto v = env::text("RINGFLOW_LOG_LEVEL");
  if (!v) return level::warn;
  try {
    return parse_level(*v);
  } catch (const usage_error& e) {
    std::fprintf(stderr, "[ringflow warn] %s; using 'warn'\n", e.what());
    return level::warn;
  }
}

std::atomic<int>& level_storage() {
  static std::atomic<int> value{static_cast<int>(initial_level())};
  return value;
}

constexpr std::string_view level_name(level l) {
  switch (l) {
    case level::off: return "off";
    case level::error: return "error";
    case level::warn: return "warn";
    case level::info: return "info";
    case level::debug: return "debug";
    case level::trace: return "trace";
  }
  return "?";
}

}  // namespace

level current_level() {
  return static_cast<level>(level_storage().load(std::memory_order_relaxed));
}

void set_level(level l) { level_storage().store(static_cast<int>(l), std::memory_order_relaxed); }

level parse_level(std::string_view text) {
  static constexpr level all[] = {level::off,  level::error, level::warn,
                                  level::info, level::debug, level::trace};
  for (level l : all) {
    if (text == level_name(l)) return l;
  }
  if (text.size() == 1 && text[0] >= '0' && text[0] <= '5')
    return static_cast<level>(text[0] - '0');
  throw usage_error(fmt::format(
      "RINGFLOW_LOG_LEVEL='{}' is not a log level: use off, error, warn, info, debug or trace",
      text));
}

void write(level l, std::string_view message) {
  static std::mutex mutex;
  std::lock_guard lock(mutex);
  std::fprintf(stderr, "[ringflow %.*s] %.*s\n", static_cast<int>(level_name(l).size()),
               level_name(l).data(), static_cast<int>(message.size()), message.data());
}

}  // namespace ringflow::log
