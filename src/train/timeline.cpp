// Chrome trace recording, writing, reading back (a small strict JSON parser) and overlap analysis.
#include "ringflow/train/timeline.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <mutex>
#include <set>
#include <sstream>
#include <utility>
#include <variant>

#include "ringflow/core/atomic_file.hpp"
#include "ringflow/core/env.hpp"
#include "ringflow/core/error.hpp"

namespace ringflow::train {

namespace {

// Offset from the steady clock to system time, fixed at first use, so spans
// are monotonic within a process and roughly aligned across processes.
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

std::string json_escape(std::string_view s) {
  std::string out;
  out.reserve(s.size() + 2);
  for (const char ch : s) {
    const auto c = static_cast<unsigned char>(ch);
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (c < 0x20) {
          out += fmt::format("\\u{:04x}", c);
        } else {
          out += ch;
        }
    }
  }
  return out;
}

const char* lane_name(lane l) { return l == lane::comm ? "comm" : "compute"; }

// The events a complete trace needs in front of the spans: names for the
// process (rank) and its two lanes.
void write_metadata(std::string& out, int rank) {
  out += fmt::format(
      R"({{"name":"process_name","ph":"M","pid":{0},"tid":0,"args":{{"name":"rank {0}"}}}},)"
      "\n",
      rank);
  out += fmt::format(
      R"({{"name":"process_sort_index","ph":"M","pid":{0},"tid":0,"args":{{"sort_index":{0}}}}},)"
      "\n",
      rank);
  for (const lane l : {lane::compute, lane::comm}) {
    out += fmt::format(
        R"({{"name":"thread_name","ph":"M","pid":{},"tid":{},"args":{{"name":"{}"}}}},)"
        "\n",
        rank, static_cast<int>(l), lane_name(l));
  }
}

// ---------------------------------------------------------------------------
// A strict RFC 8259 JSON parser, just enough to read traces back.

struct json_value;
using json_array = std::vector<json_value>;
using json_object = std::vector<std::pair<std::string, json_value>>;
struct json_value {
  std::variant<std::nullptr_t, bool, double, std::string, json_array, json_object> v;
  const json_value* find(std::string_view key) const {
    if (const auto* o = std::get_if<json_object>(&v)) {
      for (const auto& [k, val] : *o) {
        if (k == key) return &val;
      }
    }
    return nullptr;
  }
};

class json_parser {
 public:
  json_parser(std::string_view text, const std::filesystem::path& file)
      : text_(text), file_(file) {}

  json_value parse_document() {
    json_value v = parse_value(0);
    skip_ws();
    if (pos_ != text_.size()) fail("unexpected text after the top-level value");
    return v;
  }

 private:
  [[noreturn]] void fail(std::string_view what) const {
    throw error(fmt::format("trace '{}' is not valid JSON: {} at byte {}", file_.string(), what,
                            pos_));
  }
  void skip_ws() {
    while (pos_ < text_.size() &&
           (text_[pos_] == ' ' || text_[pos_] == '\n' || text_[pos_] == '\r' ||
            text_[pos_] == '\t')) {
      ++pos_;
    }
  }
  bool consume(char c) {
    skip_ws();
    if (pos_ < text_.size() && text_[pos_] == c) {
      ++pos_;
      return true;
    }
    return false;
  }
  void expect(char c) {
    if (!consume(c)) fail(fmt::format("expected '{}'", c));
  }
  void literal(std::string_view word) {
    if (text_.substr(pos_, word.size()) != word) fail("invalid literal");
    pos_ += word.size();
  }

  json_value parse_value(int depth) {
    if (depth > 64) fail("nesting deeper than 64");
    skip_ws();
    if (pos_ >= text_.size()) fail("unexpected end of input");
    const char c = text_[pos_];
    json_value out;
    if (c == '{') {
      ++pos_;
      json_object obj;
      if (!consume('}')) {
        do {
          skip_ws();
          std::string key = parse_string();
          expect(':');
          obj.emplace_back(std::move(key), parse_value(depth + 1));
        } while (consume(','));
        expect('}');
      }
      out.v = std::move(obj);
    } else if (c == '[') {
      ++pos_;
      json_array arr;
      if (!consume(']')) {
        do {
          arr.push_back(parse_value(depth + 1));
        } while (consume(','));
        expect(']');
      }
      out.v = std::move(arr);
    } else if (c == '"') {
      out.v = parse_string();
    } else if (c == 't') {
      literal("true");
      out.v = true;
    } else if (c == 'f') {
      literal("false");
      out.v = false;
    } else if (c == 'n') {
      literal("null");
      out.v = nullptr;
    } else {
      out.v = parse_number();
    }
    return out;
  }

  std::string parse_string() {
    if (pos_ >= text_.size() || text_[pos_] != '"') fail("expected a string");
    ++pos_;
    std::string s;
    for (;;) {
      if (pos_ >= text_.size()) fail("unterminated string");
      const char c = text_[pos_++];
      if (c == '"') return s;
      if (static_cast<unsigned char>(c) < 0x20) fail("control character in a string");
      if (c != '\\') {
        s += c;
        continue;
      }
      if (pos_ >= text_.size()) fail("unterminated escape");
      const char e = text_[pos_++];
      switch (e) {
        case '"': s += '"'; break;
        case '\\': s += '\\'; break;
        case '/': s += '/'; break;
        case 'b': s += '\b'; break;
        case 'f': s += '\f'; break;
        case 'n': s += '\n'; break;
        case 'r': s += '\r'; break;
        case 't': s += '\t'; break;
        case 'u': {
          if (pos_ + 4 > text_.size()) fail("short \\u escape");
          unsigned code = 0;
          for (int k = 0; k < 4; ++k) {
            const char h = text_[pos_++];
            code <<= 4;
            if (h >= '0' && h <= '9') code |= static_cast<unsigned>(h - '0');
            else if (h >= 'a' && h <= 'f') code |= static_cast<unsigned>(h - 'a' + 10);
            else if (h >= 'A' && h <= 'F') code |= static_cast<unsigned>(h - 'A' + 10);
            else fail("bad hex digit in \\u escape");
          }
          // Traces only escape control characters; keep others as '?'.
          s += code < 0x80 ? static_cast<char>(code) : '?';
          break;
        }
        default: fail("invalid escape");
      }
    }
  }

  double parse_number() {
    const std::size_t start = pos_;
    if (pos_ < text_.size() && text_[pos_] == '-') ++pos_;
    const auto digits = [&] {
      const std::size_t d0 = pos_;
      while (pos_ < text_.size() && text_[pos_] >= '0' && text_[pos_] <= '9') ++pos_;
      return pos_ - d0;
    };
    if (pos_ < text_.size() && text_[pos_] == '0') {
      ++pos_;
    } else if (digits() == 0) {
      fail("invalid value");
    }
    if (pos_ < text_.size() && text_[pos_] == '.') {
      ++pos_;
      if (digits() == 0) fail("digits expected after '.'");
    }
    if (pos_ < text_.size() && (text_[pos_] == 'e' || text_[pos_] == 'E')) {
      ++pos_;
      if (pos_ < text_.size() && (text_[pos_] == '+' || text_[pos_] == '-')) ++pos_;
      if (digits() == 0) fail("digits expected in the exponent");
    }
    return std::strtod(std::string(text_.substr(start, pos_ - start)).c_str(), nullptr);
  }

  std::string_view text_;
  const std::filesystem::path& file_;
  std::size_t pos_ = 0;
};

double number_or(const json_value* v, double fallback) {
  if (v == nullptr) return fallback;
  if (const auto* d = std::get_if<double>(&v->v)) return *d;
  return fallback;
}

// number_or() for a field that must be a whole number in [lo, hi]:
// converting an out-of-range double to an integer is undefined behaviour,
// so a corrupt trace is refused naming the field instead.
std::int64_t integer_or(const json_value* v, std::int64_t fallback, double lo, double hi,
                        const std::filesystem::path& file, std::string_view field) {
  const double d = number_or(v, static_cast<double>(fallback));
  if (!(d >= lo && d <= hi) || d != std::floor(d)) {
    throw error(fmt::format("trace '{}': an event's \"{}\" is {}, not a whole number in [{}, {}]",
                            file.string(), field, d, lo, hi));
  }
  return static_cast<std::int64_t>(d);
}

// Traces are read whole and parsed into a tree several times their size;
// anything beyond this is refused before reading.
constexpr std::uintmax_t max_trace_bytes = std::uintmax_t{1} << 30;

}  // namespace

std::filesystem::path rank_file(const std::filesystem::path& path, int rank) {
  std::filesystem::path out = path;
  const std::string ext = path.has_extension() ? path.extension().string() : ".json";
  out.replace_filename(fmt::format("{}.rank{}{}", path.stem().string(), rank, ext));
  return out;
}

double now_us() {
  return std::chrono::duration<double, std::micro>(
             std::chrono::steady_clock::now().time_since_epoch())
             .count() +
         clock_offset_us();
}

struct timeline::state {
  int rank = 0;
  std::filesystem::path file;
  mutable std::mutex mutex;
  std::vector<trace_event> events;
};

timeline::timeline(int rank, std::filesystem::path path) : state_(std::make_shared<state>()) {
  if (path.empty()) {
    throw usage_error(fmt::format("train::timeline on rank {}: the trace path is empty", rank));
  }
  state_->rank = rank;
  state_->file = rank_file(path, rank);
  (void)clock_offset_us();
}

timeline timeline::from_env(int rank) {
  const auto p = env::text("RINGFLOW_TIMELINE");
  if (!p) return {};
  return timeline(rank, *p);
}

std::filesystem::path timeline::file() const { return state_ ? state_->file : std::filesystem::path(); }

void timeline::record(trace_event e) const {
  if (!state_) return;
  e.rank = state_->rank;
  std::lock_guard lock(state_->mutex);
  // A bound so a forgotten timeline cannot eat the memory of a long run.
  if (state_->events.size() < 4'000'000) state_->events.push_back(std::move(e));
}

void timeline::record(std::string_view name, train::lane l, double start_us, double end_us,
                      std::int64_t step) const {
  if (!state_) return;
  trace_event e;
  e.name = std::string(name);
  e.lane = l;
  e.start_us = start_us;
  e.duration_us = std::max(0.0, end_us - start_us);
  e.step = step;
  record(std::move(e));
}

timeline::scoped_span::scoped_span(const timeline* owner, std::string_view name,
                                   std::int64_t step)
    : owner_(owner && owner->enabled() ? owner : nullptr),
      name_(owner_ ? std::string(name) : std::string()),
      step_(step),
      start_us_(owner_ ? now_us() : 0.0) {}

timeline::scoped_span::~scoped_span() {
  if (owner_) owner_->record(name_, lane::compute, start_us_, now_us(), step_);
}

std::vector<trace_event> timeline::events() const {
  if (!state_) return {};
  std::lock_guard lock(state_->mutex);
  return state_->events;
}

void timeline::write() const {
  if (!state_) return;
  std::vector<trace_event> evs = events();
  std::string out = "{\"traceEvents\":[\n";
  write_metadata(out, state_->rank);
  for (std::size_t i = 0; i < evs.size(); ++i) {
    const auto& e = evs[i];
    std::string args = fmt::format("\"step\":{}", e.step);
    if (e.bucket >= 0) args += fmt::format(",\"bucket\":{}", e.bucket);
    if (e.bytes >= 0) args += fmt::format(",\"bytes\":{}", e.bytes);
    out += fmt::format(
        R"({{"name":"{}","cat":"{}","ph":"X","pid":{},"tid":{},"ts":{:.3f},"dur":{:.3f},"args":{{{}}}}})",
        json_escape(e.name), lane_name(e.lane), e.rank, static_cast<int>(e.lane), e.start_us,
        e.duration_us, args);
    out += i + 1 < evs.size() ? ",\n" : "\n";
  }
  if (evs.empty()) out.erase(out.size() - 2, 1);  // the trailing comma of the metadata
  out += "],\"displayTimeUnit\":\"ms\"}\n";

  try {
    detail::write_file_atomically(state_->file, out);
  } catch (const detail::file_write_error& e) {
    throw error(fmt::format(
        "train::timeline on rank {}: {} (does the folder exist and is it writable?); set "
        "RINGFLOW_TIMELINE to a writable path",
        state_->rank, e.what()));
  }
}

std::vector<trace_event> read_trace(const std::filesystem::path& file) {
  std::ifstream f(file, std::ios::binary);
  if (!f) throw error(fmt::format("cannot open the trace '{}'", file.string()));
  std::error_code ec;
  if (const auto n = std::filesystem::file_size(file, ec); !ec && n > max_trace_bytes) {
    throw error(fmt::format("trace '{}' holds {} bytes, more than the {} read_trace accepts",
                            file.string(), n, max_trace_bytes));
  }
  std::stringstream ss;
  ss << f.rdbuf();
  const std::string text = ss.str();
  const json_value doc = json_parser(text, file).parse_document();
  const json_value* events = doc.find("traceEvents");
  const auto* arr = events ? std::get_if<json_array>(&events->v) : nullptr;
  if (arr == nullptr) {
    throw error(fmt::format("trace '{}' has no \"traceEvents\" array", file.string()));
  }
  std::vector<trace_event> out;
  for (const auto& ev : *arr) {
    const json_value* ph = ev.find("ph");
    const auto* phs = ph ? std::get_if<std::string>(&ph->v) : nullptr;
    if (phs == nullptr) {
      throw error(fmt::format("trace '{}': an event has no \"ph\"", file.string()));
    }
    if (*phs != "X") continue;
    trace_event e;
    const json_value* name = ev.find("name");
    if (name && std::holds_alternative<std::string>(name->v)) e.name = std::get<std::string>(name->v);
    e.lane = number_or(ev.find("tid"), 0) == 1 ? lane::comm : lane::compute;
    e.rank = static_cast<int>(integer_or(ev.find("pid"), 0, 0, 1 << 30, file, "pid"));
    if (!ev.find("ts") || !ev.find("dur")) {
      throw error(fmt::format("trace '{}': complete event '{}' lacks ts or dur", file.string(),
                              e.name));
    }
    e.start_us = number_or(ev.find("ts"), 0);
    e.duration_us = number_or(ev.find("dur"), 0);
    if (!std::isfinite(e.start_us) || !std::isfinite(e.duration_us)) {
      throw error(fmt::format("trace '{}': complete event '{}' has ts {} and dur {}; both must be "
                              "finite",
                              file.string(), e.name, e.start_us, e.duration_us));
    }
    if (const json_value* args = ev.find("args")) {
      // 2^53: the whole numbers a double holds exactly.
      constexpr double big = 9007199254740992.0;
      e.step = integer_or(args->find("step"), -1, -1, big, file, "args.step");
      e.bucket = integer_or(args->find("bucket"), -1, -1, big, file, "args.bucket");
      e.bytes = integer_or(args->find("bytes"), -1, -1, big, file, "args.bytes");
    }
    out.push_back(std::move(e));
  }
  return out;
}

overlap_summary summarize_overlap(const std::vector<trace_event>& events) {
  overlap_summary s;
  // Backward spans by (rank, step).
  std::map<std::pair<int, std::int64_t>, std::vector<std::pair<double, double>>> backward;
  std::set<std::pair<int, std::int64_t>> steps;
  for (const auto& e : events) {
    if (e.lane == lane::compute && e.name == "backward") {
      backward[{e.rank, e.step}].emplace_back(e.start_us, e.end_us());
      s.backward_us += e.duration_us;
      steps.insert({e.rank, e.step});
    } else if (e.lane == lane::compute && e.name == "wait") {
      s.wait_us += e.duration_us;
    }
  }
  for (const auto& e : events) {
    if (e.lane != lane::comm) continue;
    s.comm_us += e.duration_us;
    const auto it = backward.find({e.rank, e.step});
    if (it == backward.end()) continue;
    for (const auto& [b0, b1] : it->second) {
      const double lo = std::max(b0, e.start_us), hi = std::min(b1, e.end_us());
      if (hi > lo) s.hidden_us += hi - lo;
    }
  }
  // Steps are counted per rank; report them per rank (the max over ranks).
  std::map<int, std::int64_t> per_rank;
  for (const auto& [rank, step] : steps) ++per_rank[rank];
  for (const auto& [rank, n] : per_rank) s.steps = std::max(s.steps, n);
  return s;
}

}  // namespace ringflow::train
