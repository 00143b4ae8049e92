// JSON reading and writing for the library's files (see json.hpp).
#include "core/json.hpp"

#include <fmt/format.h>

#include <algorithm>

namespace ringflow::detail::json {
namespace {
struct too_deep {};

std::string where(std::string_view text, std::size_t byte) {
  // nlohmann counts the offending byte from 1.
  const std::size_t at = std::min(byte == 0 ? 0 : byte - 1, text.size());
  const auto head = text.substr(0, at);
  const std::size_t line = 1 + static_cast<std::size_t>(std::count(head.begin(), head.end(), '\n'));
  const auto nl = head.rfind('\n');
  const std::size_t column = nl == std::string_view::npos ? at + 1 : at - nl;
  return fmt::format("line {}, column {}", line, column);
}

// nlohmann's message without its "[json.exception.parse_error.101] " tag
// and, for parse errors, its "parse error at line 1, column 2: " (we say
// where ourselves, the same way for every reader).
std::string reason_of(const nlohmann::json::exception& e) {
  std::string w = e.what();
  if (w.rfind("[json.exception.", 0) == 0) {
    if (const auto end = w.find("] "); end != std::string::npos) w = w.substr(end + 2);
  }
  if (w.rfind("parse error", 0) == 0) {
    if (const auto colon = w.find(": "); colon != std::string::npos) w = w.substr(colon + 2);
  }
  return w;
}
}  // namespace

value parse(std::string_view text, int max_depth, const fail_fn& fail) {
  const value::parser_callback_t limit = [max_depth](int depth, value::parse_event_t, value&) {
    if (depth > max_depth) throw too_deep{};
    return true;
  };
  try {
    return value::parse(text.begin(), text.end(), limit, /*allow_exceptions=*/true,
                        /*ignore_comments=*/false);
  } catch (const too_deep&) {
    fail(fmt::format("nested more than {} deep", max_depth));
  } catch (const nlohmann::json::parse_error& e) {
    fail(fmt::format("{}: {}", where(text, e.byte), reason_of(e)));
  } catch (const nlohmann::json::exception& e) {
    fail(reason_of(e));
  }
  throw std::logic_error("json::parse: fail() returned");
}

std::string quote(std::string_view s) {
  return value(std::string(s)).dump(-1, ' ', false, value::error_handler_t::replace);
}

std::string trace_event(std::string_view name, std::string_view category, int pid, int tid,
                        double ts_us, double dur_us, std::string_view args) {
  return fmt::format(
      R"({{"name":{},"cat":{},"ph":"X","pid":{},"tid":{},"ts":{:.3f},"dur":{:.3f},"args":{{{}}}}})",
      quote(name), quote(category), pid, tid, ts_us, dur_us, args);
}

std::string_view kind_name(const value& v) {
  if (v.is_object()) return "an object";
  if (v.is_array()) return "an array";
  if (v.is_string()) return "a string";
  if (v.is_boolean()) return "a boolean";
  if (v.is_number()) return "a number";
  return "null";
}

}  // namespace ringflow::detail::json
