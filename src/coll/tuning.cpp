// Tuning tables: the file (a small JSON parser and writer), the lookup with
// log-log interpolation between tuned sizes, and the table-or-model choice.
#include "ringflow/coll/tuning.hpp"

#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <tuple>

#include "ringflow/core/atomic_file.hpp"
#include "ringflow/core/env.hpp"
#include "ringflow/core/error.hpp"

namespace ringflow {
namespace {

// ---- a small JSON reader (objects, arrays, strings, numbers, literals) -----

struct json {
  enum kind_t { null, boolean, number, string, array, object } kind = null;
  double num = 0;
  bool flag = false;
  std::string str;
  std::vector<json> items;                             // array
  std::vector<std::pair<std::string, json>> members;   // object, in file order
  std::size_t line = 0;                                // where the value starts

  const json* find(std::string_view key) const {
    for (const auto& [k, v] : members) {
      if (k == key) return &v;
    }
    return nullptr;
  }
};

// Bounds on what a tuning file may hold, far beyond a real one (tens of
// KB): a corrupt or hostile file is refused before it costs much memory.
constexpr std::size_t max_tuning_file_bytes = std::size_t{16} << 20;
constexpr std::size_t max_json_values = std::size_t{1} << 20;
constexpr std::size_t max_tuning_tables = 4096;

class json_reader {
 public:
  json_reader(std::string_view text, std::string_view origin) : s_(text), origin_(origin) {
    if (s_.size() > max_tuning_file_bytes) {
      throw usage_error(fmt::format("tuning table {}: {} bytes is more than the {} a tuning file "
                                    "may hold (not a valid tuning file; rerun ringflow-bench "
                                    "--tune, or set RINGFLOW_TUNING=off)",
                                    origin_, s_.size(), max_tuning_file_bytes));
    }
  }

  json document() {
    json v = value(0);
    skip();
    if (i_ != s_.size()) fail("unexpected text after the document");
    return v;
  }

 private:
  std::string_view s_;
  std::string_view origin_;
  std::size_t i_ = 0;
  std::size_t values_ = 0;
  // line() counts newlines from where it last stopped (the reader only moves
  // forward), so a long file costs linear, not quadratic, time.
  mutable std::size_t line_pos_ = 0;
  mutable std::size_t line_no_ = 1;

  std::size_t line() const {
    const std::size_t to = std::min(i_, s_.size());
    if (to < line_pos_) line_pos_ = 0, line_no_ = 1;
    line_no_ += static_cast<std::size_t>(std::count(s_.begin() + static_cast<std::ptrdiff_t>(line_pos_),
                                                    s_.begin() + static_cast<std::ptrdiff_t>(to), '\n'));
    line_pos_ = to;
    return line_no_;
  }

  [[noreturn]] void fail(std::string_view what) const {
    throw usage_error(fmt::format("tuning table {}: line {}: {} (not a valid tuning file; rerun "
                                  "ringflow-bench --tune, or set RINGFLOW_TUNING=off)",
                                  origin_, line(), what));
  }

  void skip() {
    while (i_ < s_.size() && std::isspace(static_cast<unsigned char>(s_[i_]))) ++i_;
  }

  void expect(char c) {
    skip();
    if (i_ >= s_.size() || s_[i_] != c) fail(fmt::format("expected '{}'", c));
    ++i_;
  }

  json value(int depth) {
    if (depth > 16) fail("nested too deeply");
    if (++values_ > max_json_values) fail(fmt::format("more than {} JSON values", max_json_values));
    skip();
    if (i_ >= s_.size()) fail("unexpected end of file");
    json v;
    v.line = line();
    const char c = s_[i_];
    if (c == '{') {
      v.kind = json::object;
      ++i_;
      skip();
      if (i_ < s_.size() && s_[i_] == '}') {
        ++i_;
        return v;
      }
      for (;;) {
        skip();
        if (i_ >= s_.size() || s_[i_] != '"') fail("expected a quoted key");
        std::string key = string_body();
        expect(':');
        v.members.emplace_back(std::move(key), value(depth + 1));
        skip();
        if (i_ < s_.size() && s_[i_] == ',') {
          ++i_;
          continue;
        }
        expect('}');
        return v;
      }
    }
    if (c == '[') {
      v.kind = json::array;
      ++i_;
      skip();
      if (i_ < s_.size() && s_[i_] == ']') {
        ++i_;
        return v;
      }
      for (;;) {
        v.items.push_back(value(depth + 1));
        skip();
        if (i_ < s_.size() && s_[i_] == ',') {
          ++i_;
          continue;
        }
        expect(']');
        return v;
      }
    }
    if (c == '"') {
      v.kind = json::string;
      v.str = string_body();
      return v;
    }
    for (std::string_view lit : {"true", "false", "null"}) {
      if (s_.substr(i_, lit.size()) == lit) {
        i_ += lit.size();
        v.kind = lit == "null" ? json::null : json::boolean;
        v.flag = lit == "true";
        return v;
      }
    }
    std::size_t end = i_;
    while (end < s_.size() && (std::isdigit(static_cast<unsigned char>(s_[end])) ||
                               std::strchr("+-.eE", s_[end]) != nullptr)) {
      ++end;
    }
    const std::string text(s_.substr(i_, end - i_));
    char* stop = nullptr;
    errno = 0;
    const double d = text.empty() ? 0 : std::strtod(text.c_str(), &stop);
    if (text.empty() || errno != 0 || stop != text.c_str() + text.size() || !std::isfinite(d)) {
      fail(fmt::format("'{}' is not a JSON value", s_.substr(i_, std::min<std::size_t>(12, s_.size() - i_))));
    }
    i_ = end;
    v.kind = json::number;
    v.num = d;
    return v;
  }

  // At the opening quote; returns the unescaped body (\" \\ \/ \n \t only).
  std::string string_body() {
    ++i_;
    std::string out;
    while (i_ < s_.size() && s_[i_] != '"') {
      char c = s_[i_++];
      if (c == '\\') {
        if (i_ >= s_.size()) break;
        const char e = s_[i_++];
        c = e == 'n' ? '\n' : e == 't' ? '\t' : e;
        if (std::strchr("\"\\/nt", e) == nullptr) fail(fmt::format("unsupported escape '\\{}'", e));
      }
      out.push_back(c);
    }
    if (i_ >= s_.size()) fail("unterminated string");
    ++i_;
    return out;
  }
};

std::string escaped(std::string_view s) {
  std::string out;
  for (char c : s) {
    if (c == '"' || c == '\\') out.push_back('\\');
    if (c == '\n') {
      out += "\\n";
      continue;
    }
    out.push_back(c);
  }
  return out;
}

// Field access with messages that name the file, the line and the field.
struct checker {
  std::string_view origin;

  [[noreturn]] void fail(const json& at, std::string_view what) const {
    throw usage_error(fmt::format("tuning table {}: line {}: {} (rerun ringflow-bench --tune, or "
                                  "set RINGFLOW_TUNING=off)",
                                  origin, at.line, what));
  }
  const json& field(const json& obj, std::string_view key, json::kind_t kind,
                    std::string_view kind_name) const {
    const json* v = obj.find(key);
    if (v == nullptr) fail(obj, fmt::format("\"{}\" is missing", key));
    if (v->kind != kind) fail(*v, fmt::format("\"{}\" must be {}", key, kind_name));
    return *v;
  }
  std::string text(const json& obj, std::string_view key) const {
    return field(obj, key, json::string, "a string").str;
  }
  double positive(const json& obj, std::string_view key) const {
    const json& v = field(obj, key, json::number, "a number");
    if (!(v.num > 0)) fail(v, fmt::format("\"{}\" must be positive, not {}", key, v.num));
    return v.num;
  }
  int count(const json& obj, std::string_view key, bool zero_ok = false) const {
    const json& v = field(obj, key, json::number, "a number");
    if (v.num != std::floor(v.num) || v.num < (zero_ok ? 0 : 1) || v.num > 1e9) {
      fail(v, fmt::format("\"{}\" must be a whole number of at least {}, not {}", key,
                          zero_ok ? 0 : 1, v.num));
    }
    return static_cast<int>(v.num);
  }
};

algo parse_candidate(const checker& c, const json& at, const std::string& name) {
  algo a = algo::ring;
  try {
    a = parse_algo(name);
  } catch (const usage_error&) {
    c.fail(at, fmt::format("unknown algorithm '{}'", name));
  }
  if (a == algo::automatic || a == algo::native) {
    c.fail(at, fmt::format("'{}' cannot be a tuned choice", name));
  }
  return a;
}

tuning_table parse_table(const checker& c, const json& t) {
  if (t.kind != json::object) c.fail(t, "every entry of \"tables\" must be an object");
  tuning_table out;
  out.ranks = c.count(t, "ranks");
  out.nodes = c.count(t, "nodes");
  out.ranks_per_node = c.count(t, "ranks_per_node");
  if (out.nodes > out.ranks || static_cast<long long>(out.nodes) * out.ranks_per_node < out.ranks ||
      out.ranks_per_node > out.ranks) {
    c.fail(t, fmt::format("{} ranks on {} nodes of at most {} ranks is not a layout", out.ranks,
                          out.nodes, out.ranks_per_node));
  }
  if (t.find("cores_per_node") != nullptr) out.cores_per_node = c.count(t, "cores_per_node", true);
  if (t.find("dtype") != nullptr) out.dtype = c.text(t, "dtype");
  if (t.find("op") != nullptr) out.op = c.text(t, "op");
  if (t.find("tuned_at") != nullptr) out.tuned_at = c.text(t, "tuned_at");
  if (t.find("reps") != nullptr) out.reps = c.count(t, "reps");
  if (t.find("sessions") != nullptr) out.sessions = c.count(t, "sessions");
  const json& sizes = c.field(t, "sizes", json::array, "an array");
  if (sizes.items.empty()) c.fail(sizes, "\"sizes\" is empty");
  if (sizes.items.size() > 64) c.fail(sizes, "more than 64 sizes");
  for (const json& r : sizes.items) {
    if (r.kind != json::object) c.fail(r, "every entry of \"sizes\" must be an object");
    tuning_row row;
    const double b = c.positive(r, "bytes");
    if (b != std::floor(b) || b > 1e15) c.fail(r, fmt::format("\"bytes\" {} is not a size", b));
    row.bytes = static_cast<std::size_t>(b);
    if (!out.rows.empty() && row.bytes <= out.rows.back().bytes) {
      c.fail(r, fmt::format("sizes must ascend: {} after {}", row.bytes, out.rows.back().bytes));
    }
    const json& med = c.field(r, "median_us", json::object, "an object");
    if (med.members.empty()) c.fail(med, "\"median_us\" is empty");
    for (const auto& [name, v] : med.members) {
      const algo a = parse_candidate(c, v, name);
      if (v.kind != json::number || !(v.num > 0)) {
        c.fail(v, fmt::format("the median of '{}' must be a positive number", name));
      }
      for (const auto& seen : row.median) {
        if (seen.algorithm == a) c.fail(v, fmt::format("'{}' appears twice", name));
      }
      row.median.push_back({a, v.num * 1e-6});
    }
    const json& best_v = c.field(r, "best", json::string, "a string");
    row.best = parse_candidate(c, best_v, best_v.str);
    double best_s = -1, min_s = -1;
    for (const auto& m : row.median) {
      if (m.algorithm == row.best) best_s = m.seconds;
      if (min_s < 0 || m.seconds < min_s) min_s = m.seconds;
    }
    if (best_s < 0) c.fail(best_v, fmt::format("\"best\" '{}' has no median", best_v.str));
    if (best_s > min_s) {
      c.fail(best_v, fmt::format("\"best\" '{}' ({:.3f} us) is not the lowest median ({:.3f} us)",
                                 best_v.str, best_s * 1e6, min_s * 1e6));
    }
    out.rows.push_back(std::move(row));
  }
  return out;
}

bool same_shape(const tuning_table& a, const tuning_table& b) {
  return a.ranks == b.ranks && a.nodes == b.nodes && a.ranks_per_node == b.ranks_per_node;
}

}  // namespace

// ---- the table --------------------------------------------------------------

bool tuning_table::matches(const cluster_shape& s) const {
  return ranks == s.ranks && nodes == s.nodes && ranks_per_node == s.ranks_per_node;
}

namespace {
// Straight line between (log b0, log t0) and (log b1, log t1), at log b:
// times grow like a power of the size between two tuned sizes.
double interpolate_seconds(double b0, double t0, double b1, double t1, double b) {
  const double x = (std::log(b) - std::log(b0)) / (std::log(b1) - std::log(b0));
  return std::exp(std::log(t0) + x * (std::log(t1) - std::log(t0)));
}

// Calls f(algo, seconds) for every eligible algorithm's expected time at
// `bytes`; returns the rows used (nullptr, nullptr when outside the range).
template <class F>
std::pair<const tuning_row*, const tuning_row*> for_each_expected(const tuning_table& t,
                                                                  std::size_t bytes,
                                                                  const cluster_shape& shape,
                                                                  F&& f) {
  if (t.rows.empty()) return {nullptr, nullptr};
  const auto& rows = t.rows;
  const std::size_t lo = rows.front().bytes, hi = rows.back().bytes;
  const tuning_row* a = nullptr;
  const tuning_row* b = nullptr;
  if (bytes <= lo) {
    if (bytes < lo / 4) return {nullptr, nullptr};
    a = &rows.front();
  } else if (bytes >= hi) {
    if (bytes / 4 > hi) return {nullptr, nullptr};
    a = &rows.back();
  } else {
    std::size_t i = 1;
    while (rows[i].bytes < bytes) ++i;
    if (rows[i].bytes == bytes) {
      a = &rows[i];
    } else {
      a = &rows[i - 1], b = &rows[i];
    }
  }
  for (const auto& m : a->median) {
    if (!automatic_candidate(m.algorithm, shape)) continue;
    if (b == nullptr) {
      f(m.algorithm, m.seconds);
      continue;
    }
    for (const auto& n : b->median) {
      if (n.algorithm == m.algorithm) {
        f(m.algorithm, interpolate_seconds(static_cast<double>(a->bytes), m.seconds,
                                                   static_cast<double>(b->bytes), n.seconds,
                                                   static_cast<double>(bytes)));
      }
    }
  }
  return {a, b};
}
}  // namespace

bool tuning_table::covers(std::size_t bytes) const {
  if (rows.empty()) return false;
  return bytes >= rows.front().bytes / 4 && bytes / 4 <= rows.back().bytes;
}

std::vector<algo_prediction> tuning_table::expected(std::size_t bytes, const cluster_shape& shape,
                                                    std::string* rows_used) const {
  std::vector<algo_prediction> out;
  const auto [a, b] =
      for_each_expected(*this, bytes, shape, [&](algo x, double s) { out.push_back({x, s}); });
  // Stable: on a tie the algorithm measured first (the simpler one) wins.
  std::stable_sort(out.begin(), out.end(), [](const algo_prediction& x, const algo_prediction& y) {
    return x.seconds < y.seconds;
  });
  if (rows_used != nullptr && a != nullptr) {
    *rows_used = b == nullptr ? fmt::format("{}", a->bytes) : fmt::format("{}..{}", a->bytes, b->bytes);
  }
  return out;
}

bool automatic_candidate(algo a, const cluster_shape& shape) {
  switch (a) {
    case algo::automatic:
    case algo::native: return false;
    case algo::shm: return shape.shm && shape.nodes == 1;
    case algo::hierarchical: return shape.nodes > 1 && shape.ranks_per_node > 1;
    default: return true;
  }
}

explanation choose_algorithm(const tuning_table* table, std::string_view table_origin,
                             const cost_model& m, const cluster_shape& shape, std::size_t bytes,
                             std::string_view table_note) {
  if (table != nullptr && table->matches(shape)) {
    std::string rows;
    std::vector<algo_prediction> c = table->expected(bytes, shape, &rows);
    if (!c.empty()) {
      explanation e;
      e.bytes = bytes;
      e.shape = shape;
      e.model_origin = m.origin;
      e.from_table = true;
      e.table_origin = std::string(table_origin);
      e.table_rows = rows;
      e.candidates = std::move(c);
      e.choice = e.candidates.front().algorithm;
      e.predicted_s = e.candidates.front().seconds;
      const auto& second = e.candidates.size() > 1 ? e.candidates[1] : e.candidates[0];
      e.runner_up = second.algorithm;
      e.runner_up_s = second.seconds;
      return e;
    }
    explanation e = choose_algorithm(m, shape, bytes);
    e.table_note = fmt::format("{} B is outside the sizes tuned in {} ({}..{} B, used up to a "
                               "factor 4 beyond)",
                               bytes, table_origin, table->rows.front().bytes,
                               table->rows.back().bytes);
    return e;
  }
  explanation e = choose_algorithm(m, shape, bytes);
  e.table_note = std::string(table_note);
  return e;
}

algo fastest_algorithm(const tuning_table* table, const cost_model& m, const cluster_shape& shape,
                       std::size_t bytes) {
  if (table != nullptr && table->matches(shape)) {
    algo best = algo::ring;
    double best_s = -1;
    for_each_expected(*table, bytes, shape, [&](algo a, double s) {
      if (best_s < 0 || s < best_s) best = a, best_s = s;
    });
    if (best_s >= 0) return best;
  }
  return fastest_algorithm(m, shape, bytes);
}

tuning_table merge_sessions(const tuning_table& old, const tuning_table& fresh) {
  if (!same_shape(old, fresh) || old.rows.size() != fresh.rows.size()) return fresh;
  for (std::size_t i = 0; i < old.rows.size(); ++i) {
    if (old.rows[i].bytes != fresh.rows[i].bytes) return fresh;
  }
  tuning_table out = fresh;
  const double w = std::max(1, old.sessions);
  for (std::size_t i = 0; i < out.rows.size(); ++i) {
    tuning_row& row = out.rows[i];
    double best_s = -1;
    for (auto& m : row.median) {
      for (const auto& o : old.rows[i].median) {
        if (o.algorithm == m.algorithm) {
          m.seconds = std::exp((w * std::log(o.seconds) + std::log(m.seconds)) / (w + 1));
        }
      }
      if (best_s < 0 || m.seconds < best_s) best_s = m.seconds, row.best = m.algorithm;
    }
  }
  out.sessions = static_cast<int>(w) + 1;
  return out;
}

// ---- the file ---------------------------------------------------------------

const tuning_table* tuning_file::find(const cluster_shape& shape) const {
  for (const auto& t : tables) {
    if (t.matches(shape)) return &t;
  }
  return nullptr;
}

void tuning_file::put(tuning_table t) {
  for (auto& old : tables) {
    if (same_shape(old, t)) {
      old = std::move(t);
      return;
    }
  }
  tables.push_back(std::move(t));
  std::stable_sort(tables.begin(), tables.end(), [](const tuning_table& a, const tuning_table& b) {
    return std::tie(a.ranks, a.nodes, a.ranks_per_node) < std::tie(b.ranks, b.nodes, b.ranks_per_node);
  });
}

std::string tuning_file::to_json() const {
  std::string s = fmt::format(
      "{{\n  \"format\": \"ringflow-tuning\",\n  \"version\": 1,\n  \"machine\": \"{}\",\n"
      "  \"tables\": [",
      escaped(machine));
  for (std::size_t i = 0; i < tables.size(); ++i) {
    const tuning_table& t = tables[i];
    s += fmt::format(
        "{}\n    {{\n      \"ranks\": {}, \"nodes\": {}, \"ranks_per_node\": {}, "
        "\"cores_per_node\": {},\n      \"dtype\": \"{}\", \"op\": \"{}\", \"reps\": {}, "
        "\"sessions\": {}, \"tuned_at\": \"{}\",\n      \"sizes\": [",
        i ? "," : "", t.ranks, t.nodes, t.ranks_per_node, t.cores_per_node, escaped(t.dtype),
        escaped(t.op), std::max(1, t.reps), std::max(1, t.sessions), escaped(t.tuned_at));
    for (std::size_t j = 0; j < t.rows.size(); ++j) {
      const tuning_row& r = t.rows[j];
      s += fmt::format("{}\n        {{\"bytes\": {}, \"best\": \"{}\", \"median_us\": {{", j ? "," : "",
                       r.bytes, algo_name(r.best));
      for (std::size_t k = 0; k < r.median.size(); ++k) {
        s += fmt::format("{}\"{}\": {:.3f}", k ? ", " : "", algo_name(r.median[k].algorithm),
                         r.median[k].seconds * 1e6);
      }
      s += "}}";
    }
    s += "\n      ]\n    }";
  }
  s += "\n  ]\n}\n";
  return s;
}

tuning_file tuning_file::from_json(std::string_view text, std::string_view origin) {
  const json doc = json_reader(text, origin).document();
  const checker c{origin};
  if (doc.kind != json::object) c.fail(doc, "the document must be a JSON object");
  const json* format = doc.find("format");
  if (format == nullptr || format->kind != json::string || format->str != "ringflow-tuning") {
    c.fail(doc, "not a ringflow tuning table (no \"format\": \"ringflow-tuning\")");
  }
  const json& version = c.field(doc, "version", json::number, "a number");
  if (version.num != 1) {
    c.fail(version, fmt::format("version {} is not supported (this ringflow reads version 1)",
                                version.num));
  }
  tuning_file f;
  f.origin = std::string(origin);
  f.machine = c.text(doc, "machine");
  if (f.machine.empty()) c.fail(doc, "\"machine\" is empty");
  const json& tables = c.field(doc, "tables", json::array, "an array");
  if (tables.items.size() > max_tuning_tables) {
    c.fail(tables, fmt::format("\"tables\" holds {} tables, more than {}", tables.items.size(),
                               max_tuning_tables));
  }
  for (const json& t : tables.items) {
    tuning_table table = parse_table(c, t);
    for (const auto& seen : f.tables) {
      if (same_shape(seen, table)) {
        c.fail(t, fmt::format("two tables for {} ranks on {} node(s) x {}", table.ranks,
                              table.nodes, table.ranks_per_node));
      }
    }
    f.tables.push_back(std::move(table));
  }
  return f;
}

std::string tuning_host() {
  char name[256] = {};
  gethostname(name, sizeof name - 1);
  std::string s = name;
  return s.empty() ? "unknown-host" : s;
}

std::string tuning_path() {
  if (const auto v = env::text("RINGFLOW_TUNING")) {
    // A switch's off (or `none`) ignores tables; its on is the default path.
    const auto on = env::parse_switch(*v);
    if ((on && !*on) || env::iequals(*v, "none")) return {};
    if (!on) return *v;
  }
  // The file names the machine, so a home directory shared by a cluster's
  // nodes keeps one file per host.
  std::string host = tuning_host();
  for (char& ch : host) {
    if (!std::isalnum(static_cast<unsigned char>(ch)) && ch != '-' && ch != '.' && ch != '_') ch = '_';
  }
  return (env::cache_dir() / ("tuning-" + host + ".json")).string();
}

std::optional<tuning_file> read_tuning_file(const std::string& path) {
  if (path.empty()) return std::nullopt;
  std::error_code ec;
  if (!std::filesystem::exists(path, ec)) return std::nullopt;
  // Refuse an oversized file before reading it into memory.
  if (const auto n = std::filesystem::file_size(path, ec); !ec && n > max_tuning_file_bytes) {
    throw usage_error(fmt::format("tuning table {}: {} bytes is more than the {} a tuning file "
                                  "may hold (rerun ringflow-bench --tune, or set "
                                  "RINGFLOW_TUNING=off)",
                                  path, n, max_tuning_file_bytes));
  }
  std::ifstream in(path);
  if (!in) {
    throw usage_error(fmt::format("tuning table {}: cannot be read: {}", path, std::strerror(errno)));
  }
  std::stringstream ss;
  ss << in.rdbuf();
  return tuning_file::from_json(ss.str(), path);
}

void save_tuning_file(const tuning_file& f, const std::string& path) {
  try {
    detail::write_file_atomically(path, f.to_json(), {.create_directories = true});
  } catch (const detail::file_write_error& e) {
    throw usage_error(fmt::format("cannot save the tuning table: {}", e.what()));
  }
}

}  // namespace ringflow
