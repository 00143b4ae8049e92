// Chrome trace recording, writing, reading back (JSON through core/json.hpp) and overlap analysis.
#include "ringflow/train/timeline.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <mutex>
#include <set>
#include <sstream>
#include <utility>

#include "core/json.hpp"
#include "core/trace_clock.hpp"
#include "ringflow/core/atomic_file.hpp"
#include "ringflow/core/env.hpp"
#include "ringflow/core/error.hpp"

namespace ringflow::train {

namespace {

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
    out +=
        fmt::format(R"({{"name":"thread_name","ph":"M","pid":{},"tid":{},"args":{{"name":"{}"}}}},)"
                    "\n",
                    rank, static_cast<int>(l), lane_name(l));
  }
}

using detail::json::value;

// doc[key] as a number, or `fallback` when absent or not a number.
double number_or(const value& obj, std::string_view key, double fallback) {
  const auto it = obj.find(key);
  return it != obj.end() && it->is_number() ? it->get<double>() : fallback;
}

// number_or() for a field that must be a whole number in [lo, hi]:
// converting an out-of-range double to an integer is undefined behaviour,
// so a corrupt trace is refused naming the field instead.
std::int64_t integer_or(const value& obj, std::string_view key, std::int64_t fallback, double lo,
                        double hi, const std::filesystem::path& file, std::string_view field) {
  const double d = number_or(obj, key, static_cast<double>(fallback));
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

// One clock and one naming for every trace the library writes (core/trace_clock.hpp).
std::filesystem::path rank_file(const std::filesystem::path& path, int rank) {
  return detail::trace::rank_file(path, rank);
}

double now_us() { return detail::trace::now_us(); }

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
  (void)now_us();  // fixes the clock offset now, not at the first span
}

timeline timeline::from_env(int rank) {
  const auto p = env::text("RINGFLOW_TIMELINE");
  if (!p) return {};
  return timeline(rank, *p);
}

std::filesystem::path timeline::file() const {
  return state_ ? state_->file : std::filesystem::path();
}

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

timeline::scoped_span::scoped_span(const timeline* owner, std::string_view name, std::int64_t step)
    : owner_(owner && owner->enabled() ? owner : nullptr),
      name_(owner_ ? std::string(name) : std::string()), step_(step),
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
    out += detail::json::trace_event(e.name, lane_name(e.lane), e.rank, static_cast<int>(e.lane),
                                     e.start_us, e.duration_us, args);
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
  const value doc = detail::json::parse(text, 64, [&](const std::string& why) {
    throw error(fmt::format("trace '{}' is not valid JSON: {}", file.string(), why));
  });
  const auto events = doc.is_object() ? doc.find("traceEvents") : doc.end();
  if (events == doc.end() || !events->is_array()) {
    throw error(fmt::format("trace '{}' has no \"traceEvents\" array", file.string()));
  }
  std::vector<trace_event> out;
  for (const value& ev : *events) {
    const auto ph = ev.is_object() ? ev.find("ph") : ev.end();
    if (ph == ev.end() || !ph->is_string()) {
      throw error(fmt::format("trace '{}': an event has no \"ph\"", file.string()));
    }
    if (*ph != "X") continue;
    trace_event e;
    if (const auto name = ev.find("name"); name != ev.end() && name->is_string()) {
      e.name = name->get<std::string>();
    }
    e.lane = number_or(ev, "tid", 0) == 1 ? lane::comm : lane::compute;
    e.rank = static_cast<int>(integer_or(ev, "pid", 0, 0, 1 << 30, file, "pid"));
    if (!ev.contains("ts") || !ev.contains("dur")) {
      throw error(
          fmt::format("trace '{}': complete event '{}' lacks ts or dur", file.string(), e.name));
    }
    e.start_us = number_or(ev, "ts", 0);
    e.duration_us = number_or(ev, "dur", 0);
    if (!std::isfinite(e.start_us) || !std::isfinite(e.duration_us)) {
      throw error(
          fmt::format("trace '{}': complete event '{}' has ts {} and dur {}; both must be "
                      "finite",
                      file.string(), e.name, e.start_us, e.duration_us));
    }
    if (const auto args = ev.find("args"); args != ev.end() && args->is_object()) {
      // 2^53: the whole numbers a double holds exactly.
      constexpr double big = 9007199254740992.0;
      e.step = integer_or(*args, "step", -1, -1, big, file, "args.step");
      e.bucket = integer_or(*args, "bucket", -1, -1, big, file, "args.bucket");
      e.bytes = integer_or(*args, "bytes", -1, -1, big, file, "args.bytes");
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
