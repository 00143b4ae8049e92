// ps's Chrome-trace recorder (see trace.hpp): spans in memory, one atomic write per rank.
#include "ps/trace.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <utility>

#include "core/json.hpp"
#include "ringflow/core/atomic_file.hpp"
#include "ringflow/core/error.hpp"

namespace ringflow::ps::detail {

trace_recorder::trace_recorder(int rank, std::filesystem::path file, int servers, bool worker,
                               bool server)
    : rank_(rank), file_(std::move(file)), servers_(servers), worker_(worker), server_(server) {}

void trace_recorder::record(std::string name, int lane, double start_us, double end_us,
                            std::string args) {
  std::lock_guard lock(mutex_);
  // A bound so a forgotten trace cannot eat the memory of a long run (as
  // train::timeline's).
  if (spans_.size() >= 4'000'000) return;
  spans_.push_back(
      {std::move(name), lane, start_us, std::max(0.0, end_us - start_us), std::move(args)});
}

bool trace_recorder::dirty() const {
  std::lock_guard lock(mutex_);
  return !ever_written_ || spans_.size() != written_;
}

void trace_recorder::write() {
  std::vector<span> spans;
  {
    std::lock_guard lock(mutex_);
    spans = spans_;
  }
  std::vector<std::string> items;
  items.push_back(fmt::format(
      R"({{"name":"process_name","ph":"M","pid":{0},"tid":0,"args":{{"name":"rank {0}"}}}})",
      rank_));
  items.push_back(fmt::format(
      R"({{"name":"process_sort_index","ph":"M","pid":{0},"tid":0,"args":{{"sort_index":{0}}}}})",
      rank_));
  const auto lane = [&](int tid, const std::string& name) {
    items.push_back(
        fmt::format(R"({{"name":"thread_name","ph":"M","pid":{},"tid":{},"args":{{"name":{}}}}})",
                    rank_, tid, ringflow::detail::json::quote(name)));
  };
  if (server_) lane(server_lane, "ps server");
  if (worker_ && servers_ == 0) lane(worker_lane(0), "ps worker (local SGD)");
  if (worker_) {
    for (int s = 0; s < servers_; ++s)
      lane(worker_lane(s), fmt::format("ps worker -> server {}", s));
  }
  for (const auto& s : spans) {
    items.push_back(ringflow::detail::json::trace_event(
        s.name, s.lane == server_lane ? "ps server" : "ps worker", rank_, s.lane, s.start_us,
        s.dur_us, s.args));
  }
  std::string out = "{\"traceEvents\":[\n";
  for (std::size_t i = 0; i < items.size(); ++i) {
    out += items[i];
    out += i + 1 < items.size() ? ",\n" : "\n";
  }
  out += "],\"displayTimeUnit\":\"ms\"}\n";
  try {
    ringflow::detail::write_file_atomically(file_, out);
  } catch (const ringflow::detail::file_write_error& e) {
    throw error(fmt::format(
        "ps::node on rank {}: cannot write its trace: {}; set ps::options::timeline_path or "
        "RINGFLOW_TIMELINE to a writable path",
        rank_, e.what()));
  }
  std::lock_guard lock(mutex_);
  written_ = spans.size();
  ever_written_ = true;
}

}  // namespace ringflow::ps::detail
