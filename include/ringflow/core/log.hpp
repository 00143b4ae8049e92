// Leveled logging through fmt. The level comes from RINGFLOW_LOG_LEVEL
// (error, warn, info, debug, trace; default warn) and can be changed at run time.
#pragma once

#include <fmt/format.h>

#include <string_view>

namespace ringflow::log {

enum class level : int { off = 0, error = 1, warn = 2, info = 3, debug = 4, trace = 5 };

/// Current threshold: messages above it are dropped without formatting.
level current_level();
void set_level(level l);
/// Parses "error", "warn", "info", "debug", "trace", "off" (or 0..5); throws usage_error.
level parse_level(std::string_view text);

/// Writes one line to stderr: "[ringflow <level>] message". Thread-safe.
void write(level l, std::string_view message);

template <class... Args>
void emit(level l, fmt::format_string<Args...> f, Args&&... args) {
  if (static_cast<int>(l) <= static_cast<int>(current_level())) {
    write(l, fmt::format(f, std::forward<Args>(args)...));
  }
}

template <class... Args>
void error(fmt::format_string<Args...> f, Args&&... args) {
  emit(level::error, f, std::forward<Args>(args)...);
}
template <class... Args>
void warn(fmt::format_string<Args...> f, Args&&... args) {
  emit(level::warn, f, std::forward<Args>(args)...);
}
template <class... Args>
void info(fmt::format_string<Args...> f, Args&&... args) {
  emit(level::info, f, std::forward<Args>(args)...);
}
template <class... Args>
void debug(fmt::format_string<Args...> f, Args&&... args) {
  emit(level::debug, f, std::forward<Args>(args)...);
}
template <class... Args>
void trace(fmt::format_string<Args...> f, Args&&... args) {
  emit(level::trace, f, std::forward<Args>(args)...);
}

}  // namespace ringflow::log
