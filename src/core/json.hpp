// Reading and writing the small JSON files ringflow keeps (tuning tables, the
// cost model, timeline traces): nlohmann_json underneath, private to the
// compiled library (no public header includes this one). docs/design.md says
// why a library rather than the three hand-written parsers this replaced.
#pragma once

#include <cstddef>
#include <functional>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>

namespace ringflow::detail::json {

/// A parsed document; objects keep their members in file order.
using value = nlohmann::ordered_json;

/// Called with a reason ("line 3, column 14: ...") when a document is not
/// valid; it must throw (the reader's own error type, naming its file).
using fail_fn = std::function<void(const std::string& reason)>;

/// Parses `text`, one whole JSON document (RFC 8259: no comments, nothing
/// but white space after it) nested at most `max_depth` deep. Bad input,
/// including numbers outside a double's range, calls fail(); this never
/// returns a partial document.
value parse(std::string_view text, int max_depth, const fail_fn& fail);

/// `s` as a JSON string literal: quotes, backslashes and control characters
/// escaped; invalid UTF-8 replaced by U+FFFD, so any text gives valid JSON.
std::string quote(std::string_view s);

/// One Chrome-trace complete event ("ph":"X"), the one writer of both the
/// trainer's timeline and the pipeline executor's trace. `args` is the body
/// of the args object (`"step":3,"bucket":1`), already JSON.
std::string trace_event(std::string_view name, std::string_view category, int pid, int tid,
                        double ts_us, double dur_us, std::string_view args);

/// What a value is, for messages: "a number", "an object", ...
std::string_view kind_name(const value& v);

/// A JSON path for messages: "tables[2].sizes[0]".
inline std::string member(const std::string& path, std::string_view key) {
  return path.empty() ? std::string(key) : path + "." + std::string(key);
}
inline std::string element(const std::string& path, std::size_t i) {
  return path + "[" + std::to_string(i) + "]";
}

}  // namespace ringflow::detail::json
