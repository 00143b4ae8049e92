// Tuning tables: the file (JSON, read through core/json.hpp), the lookup with
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

#include "core/json.hpp"
#include "ringflow/coll/algorithms.hpp"
#include "ringflow/core/atomic_file.hpp"
#include "ringflow/core/env.hpp"
#include "ringflow/core/error.hpp"

namespace ringflow {
namespace {

// ---- reading a tuning file (JSON through core/json.hpp) ---------------------

namespace json = detail::json;
using json::value;

// Bounds on what a tuning file may hold, far beyond a real one (tens of
// KB): a corrupt or hostile file is refused before it costs much memory.
constexpr std::size_t max_tuning_file_bytes = std::size_t{16} << 20;
constexpr std::size_t max_tuning_tables = 4096;
constexpr int max_tuning_depth = 16;

// Field access with messages that name the file, where in it (a JSON path:
// tables[0].sizes[3].best) and the field.
struct checker {
  std::string_view origin;

  [[noreturn]] void fail(const std::string& at, std::string_view what) const {
    throw usage_error(
        fmt::format("tuning table {}: {}{} (not a valid tuning file; rerun "
                    "ringflow-bench --tune, or set RINGFLOW_TUNING=off)",
                    origin, at.empty() ? "" : at + ": ", what));
  }
  const value& field(const value& obj, const std::string& at, std::string_view key,
                     value::value_t kind, std::string_view kind_name) const {
    const auto it = obj.find(key);
    if (it == obj.end()) fail(at, fmt::format("\"{}\" is missing", key));
    const bool ok = kind == value::value_t::number_float ? it->is_number() : it->type() == kind;
    if (!ok) fail(json::member(at, key), fmt::format("\"{}\" must be {}", key, kind_name));
    return *it;
  }
  std::string text(const value& obj, const std::string& at, std::string_view key) const {
    return field(obj, at, key, value::value_t::string, "a string").get<std::string>();
  }
  double number(const value& obj, const std::string& at, std::string_view key) const {
    return field(obj, at, key, value::value_t::number_float, "a number").get<double>();
  }
  double positive(const value& obj, const std::string& at, std::string_view key) const {
    const double v = number(obj, at, key);
    if (!(v > 0))
      fail(json::member(at, key), fmt::format("\"{}\" must be positive, not {}", key, v));
    return v;
  }
  int count(const value& obj, const std::string& at, std::string_view key,
            bool zero_ok = false) const {
    const double v = number(obj, at, key);
    if (v != std::floor(v) || v < (zero_ok ? 0 : 1) || v > 1e9) {
      fail(json::member(at, key),
           fmt::format("\"{}\" must be a whole number of at least {}, not {}", key, zero_ok ? 0 : 1,
                       v));
    }
    return static_cast<int>(v);
  }
};

algo parse_candidate(const checker& c, const std::string& at, const std::string& name) {
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

tuning_table parse_table(const checker& c, const value& t, const std::string& at) {
  if (!t.is_object()) c.fail(at, "every entry of \"tables\" must be an object");
  tuning_table out;
  out.ranks = c.count(t, at, "ranks");
  out.nodes = c.count(t, at, "nodes");
  out.ranks_per_node = c.count(t, at, "ranks_per_node");
  if (out.nodes > out.ranks || static_cast<long long>(out.nodes) * out.ranks_per_node < out.ranks ||
      out.ranks_per_node > out.ranks) {
    c.fail(at, fmt::format("{} ranks on {} nodes of at most {} ranks is not a layout", out.ranks,
                           out.nodes, out.ranks_per_node));
  }
  if (t.contains("cores_per_node")) out.cores_per_node = c.count(t, at, "cores_per_node", true);
  if (t.contains("dtype")) out.dtype = c.text(t, at, "dtype");
  if (t.contains("op")) out.op = c.text(t, at, "op");
  if (t.contains("tuned_at")) out.tuned_at = c.text(t, at, "tuned_at");
  if (t.contains("reps")) out.reps = c.count(t, at, "reps");
  if (t.contains("sessions")) out.sessions = c.count(t, at, "sessions");
  const std::string sizes_at = json::member(at, "sizes");
  const value& sizes = c.field(t, at, "sizes", value::value_t::array, "an array");
  if (sizes.empty()) c.fail(sizes_at, "\"sizes\" is empty");
  if (sizes.size() > 64) c.fail(sizes_at, "more than 64 sizes");
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    const value& r = sizes[i];
    const std::string row_at = json::element(sizes_at, i);
    if (!r.is_object()) c.fail(row_at, "every entry of \"sizes\" must be an object");
    tuning_row row;
    const double b = c.positive(r, row_at, "bytes");
    if (b != std::floor(b) || b > 1e15)
      c.fail(row_at, fmt::format("\"bytes\" {} is not a size", b));
    row.bytes = static_cast<std::size_t>(b);
    if (!out.rows.empty() && row.bytes <= out.rows.back().bytes) {
      c.fail(row_at,
             fmt::format("sizes must ascend: {} after {}", row.bytes, out.rows.back().bytes));
    }
    const std::string med_at = json::member(row_at, "median_us");
    const value& med = c.field(r, row_at, "median_us", value::value_t::object, "an object");
    if (med.empty()) c.fail(med_at, "\"median_us\" is empty");
    for (const auto& [name, v] : med.items()) {
      const std::string v_at = json::member(med_at, name);
      const algo a = parse_candidate(c, v_at, name);
      if (!v.is_number() || !(v.get<double>() > 0)) {
        c.fail(v_at, fmt::format("the median of '{}' must be a positive number", name));
      }
      for (const auto& seen : row.median) {
        if (seen.algorithm == a) c.fail(v_at, fmt::format("'{}' appears twice", name));
      }
      row.median.push_back({a, v.get<double>() * 1e-6});
    }
    const std::string best_at = json::member(row_at, "best");
    const std::string best_name = c.text(r, row_at, "best");
    row.best = parse_candidate(c, best_at, best_name);
    double best_s = -1, min_s = -1;
    for (const auto& m : row.median) {
      if (m.algorithm == row.best) best_s = m.seconds;
      if (min_s < 0 || m.seconds < min_s) min_s = m.seconds;
    }
    if (best_s < 0) c.fail(best_at, fmt::format("\"best\" '{}' has no median", best_name));
    if (best_s > min_s) {
      c.fail(best_at, fmt::format("\"best\" '{}' ({:.3f} us) is not the lowest median ({:.3f} us)",
                                  best_name, best_s * 1e6, min_s * 1e6));
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
  const auto [a, b] = for_each_expected(*this, bytes, shape, [&](algo x, double s) {
    out.push_back({x, s});
  });
  // Stable: on a tie the algorithm measured first (the simpler one) wins.
  std::stable_sort(out.begin(), out.end(), [](const algo_prediction& x, const algo_prediction& y) {
    return x.seconds < y.seconds;
  });
  if (rows_used != nullptr && a != nullptr) {
    *rows_used =
        b == nullptr ? fmt::format("{}", a->bytes) : fmt::format("{}..{}", a->bytes, b->bytes);
  }
  return out;
}

bool automatic_candidate(algo a, const cluster_shape& shape) {
  const algorithm_info& info = algorithm_info_of(a);
  return info.automatic && (info.eligible == nullptr || info.eligible(shape));
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
    e.table_note = fmt::format(
        "{} B is outside the sizes tuned in {} ({}..{} B, used up to a "
        "factor 4 beyond)",
        bytes, table_origin, table->rows.front().bytes, table->rows.back().bytes);
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
    return std::tie(a.ranks, a.nodes, a.ranks_per_node) <
           std::tie(b.ranks, b.nodes, b.ranks_per_node);
  });
}

std::string tuning_file::to_json() const {
  std::string s = fmt::format(
      "{{\n  \"format\": \"ringflow-tuning\",\n  \"version\": 1,\n  \"machine\": {},\n"
      "  \"tables\": [",
      json::quote(machine));
  for (std::size_t i = 0; i < tables.size(); ++i) {
    const tuning_table& t = tables[i];
    s += fmt::format(
        "{}\n    {{\n      \"ranks\": {}, \"nodes\": {}, \"ranks_per_node\": {}, "
        "\"cores_per_node\": {},\n      \"dtype\": {}, \"op\": {}, \"reps\": {}, "
        "\"sessions\": {}, \"tuned_at\": {},\n      \"sizes\": [",
        i ? "," : "", t.ranks, t.nodes, t.ranks_per_node, t.cores_per_node, json::quote(t.dtype),
        json::quote(t.op), std::max(1, t.reps), std::max(1, t.sessions), json::quote(t.tuned_at));
    for (std::size_t j = 0; j < t.rows.size(); ++j) {
      const tuning_row& r = t.rows[j];
      s += fmt::format("{}\n        {{\"bytes\": {}, \"best\": \"{}\", \"median_us\": {{",
                       j ? "," : "", r.bytes, algo_name(r.best));
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
  const checker c{origin};
  if (text.size() > max_tuning_file_bytes) {
    c.fail("", fmt::format("{} bytes is more than the {} a tuning file may hold", text.size(),
                           max_tuning_file_bytes));
  }
  const value doc =
      json::parse(text, max_tuning_depth, [&](const std::string& why) { c.fail("", why); });
  if (!doc.is_object()) c.fail("", "the document must be a JSON object");
  const auto format = doc.find("format");
  if (format == doc.end() || !format->is_string() ||
      format->get<std::string>() != "ringflow-tuning") {
    c.fail("", "not a ringflow tuning table (no \"format\": \"ringflow-tuning\")");
  }
  const double version = c.number(doc, "", "version");
  if (version != 1) {
    c.fail("version",
           fmt::format("version {} is not supported (this ringflow reads version 1)", version));
  }
  tuning_file f;
  f.origin = std::string(origin);
  f.machine = c.text(doc, "", "machine");
  if (f.machine.empty()) c.fail("machine", "\"machine\" is empty");
  const value& tables = c.field(doc, "", "tables", value::value_t::array, "an array");
  if (tables.size() > max_tuning_tables) {
    c.fail("tables", fmt::format("\"tables\" holds {} tables, more than {}", tables.size(),
                                 max_tuning_tables));
  }
  for (std::size_t i = 0; i < tables.size(); ++i) {
    const std::string at = json::element("tables", i);
    tuning_table table = parse_table(c, tables[i], at);
    for (const auto& seen : f.tables) {
      if (same_shape(seen, table)) {
        c.fail(at, fmt::format("two tables for {} ranks on {} node(s) x {}", table.ranks,
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
    if (!std::isalnum(static_cast<unsigned char>(ch)) && ch != '-' && ch != '.' && ch != '_')
      ch = '_';
  }
  return (env::cache_dir() / ("tuning-" + host + ".json")).string();
}

std::optional<tuning_file> read_tuning_file(const std::string& path) {
  if (path.empty()) return std::nullopt;
  std::error_code ec;
  if (!std::filesystem::exists(path, ec)) return std::nullopt;
  // Refuse an oversized file before reading it into memory.
  if (const auto n = std::filesystem::file_size(path, ec); !ec && n > max_tuning_file_bytes) {
    throw usage_error(
        fmt::format("tuning table {}: {} bytes is more than the {} a tuning file "
                    "may hold (rerun ringflow-bench --tune, or set "
                    "RINGFLOW_TUNING=off)",
                    path, n, max_tuning_file_bytes));
  }
  std::ifstream in(path);
  if (!in) {
    throw usage_error(
        fmt::format("tuning table {}: cannot be read: {}", path, std::strerror(errno)));
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
