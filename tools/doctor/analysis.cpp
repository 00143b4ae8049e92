// ringflow-doctor: reading dumps (strictly: a bad file is one clear error)
// and diagnosing them.
#include "analysis.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <tuple>

namespace ringflow::doctor {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

// Bounds that no real dump exceeds (65536 records per communicator, and a
// few hundred communicators): a larger file is not a dump.
constexpr std::uintmax_t max_file_bytes = 1ull << 30;
constexpr std::size_t max_line_bytes = 64 * 1024;
constexpr int max_ranks = 1 << 20;

[[noreturn]] void bad(const std::string& path, std::size_t line, const std::string& what) {
  throw load_error(fmt::format("{}:{}: {}", path, line, what));
}

struct field_reader {
  const json& obj;
  const std::string& path;
  std::size_t line;

  const json& get(const char* name) const {
    auto it = obj.find(name);
    if (it == obj.end()) bad(path, line, fmt::format("field '{}' is missing", name));
    return *it;
  }
  std::string str(const char* name) const {
    const json& v = get(name);
    if (!v.is_string()) bad(path, line, fmt::format("field '{}' is not a string", name));
    return v.get<std::string>();
  }
  std::int64_t integer(const char* name, std::int64_t lo, std::int64_t hi) const {
    const json& v = get(name);
    if (!v.is_number_integer()) bad(path, line, fmt::format("field '{}' is not an integer", name));
    if (v.is_number_unsigned() &&
        v.get<std::uint64_t>() >
            static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max())) {
      bad(path, line, fmt::format("field '{}' is out of range", name));
    }
    const std::int64_t x = v.get<std::int64_t>();
    if (x < lo || x > hi) {
      bad(path, line, fmt::format("field '{}' = {} is outside [{}, {}]", name, x, lo, hi));
    }
    return x;
  }
  std::uint64_t unsigned_integer(const char* name) const {
    const json& v = get(name);
    if (!v.is_number_unsigned()) {
      bad(path, line, fmt::format("field '{}' is not a non-negative integer", name));
    }
    return v.get<std::uint64_t>();
  }
};

constexpr std::int64_t i64max = std::numeric_limits<std::int64_t>::max();

const std::set<std::string> known_states = {"empty", "running", "done", "failed"};
const std::set<std::string> known_kinds = {
    "allreduce", "reduce_scatter", "allgather",  "broadcast",       "barrier",
    "alltoall",  "alltoallv",      "gather",     "gatherv",         "scatter",
    "scatterv",  "reduce",         "allgatherv", "reduce_scatter_v"};

std::string rank_list(const std::vector<int>& ranks) {
  if (ranks.size() == 1) return fmt::format("rank {}", ranks[0]);
  return fmt::format("ranks {}", fmt::join(ranks, ","));
}

std::string seconds(std::int64_t ns) {
  return fmt::format("{:.1f} s", static_cast<double>(ns) / 1e9);
}

// What must agree across ranks for one sequence number.
std::string call_of(const record& r) { return describe(r); }

}  // namespace

std::string describe(const record& r) {
  std::string s = fmt::format("{}({}", r.kind, r.dtype);
  if (r.kind == "allreduce" || r.kind == "reduce_scatter" || r.kind == "reduce" ||
      r.kind == "reduce_scatter_v") {
    s += fmt::format(", {}", r.op);
  }
  if (r.kind == "broadcast" || r.kind == "reduce" || r.kind.starts_with("gather") ||
      r.kind.starts_with("scatter")) {
    s += fmt::format(", root={}", r.root);
  }
  s += fmt::format(", count={})", r.count);
  return s;
}

dump load_dump(const std::string& path, std::size_t index) {
  std::error_code ec;
  const auto status = fs::status(path, ec);
  if (ec || !fs::exists(status)) throw load_error(fmt::format("{}: no such file", path));
  if (!fs::is_regular_file(status)) throw load_error(fmt::format("{}: not a regular file", path));
  const auto bytes = fs::file_size(path, ec);
  if (ec) throw load_error(fmt::format("{}: cannot read its size: {}", path, ec.message()));
  if (bytes > max_file_bytes) {
    throw load_error(
        fmt::format("{}: {} bytes is larger than any flight-recorder dump ({} at most)", path,
                    bytes, max_file_bytes));
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) throw load_error(fmt::format("{}: cannot open", path));

  dump d;
  d.path = path;
  std::string text;
  std::size_t line = 0;
  bool header = false;
  while (std::getline(in, text)) {
    ++line;
    if (text.size() > max_line_bytes) {
      bad(path, line, fmt::format("line of {} bytes is too long for a dump", text.size()));
    }
    if (text.empty()) continue;
    json obj;
    try {
      obj = json::parse(text);
    } catch (const json::exception& e) {
      bad(path, line, fmt::format("not JSON: {}", e.what()));
    }
    if (!obj.is_object()) bad(path, line, "not a JSON object");
    const field_reader f{obj, path, line};
    const std::string type = f.str("type");
    if (!header && type != "header") {
      bad(path, line, "the first line is not the dump's header: is this a ringflow-flight file?");
    }
    if (type == "header") {
      if (header) bad(path, line, "a second header line");
      if (f.str("format") != "ringflow-flight") bad(path, line, "format is not 'ringflow-flight'");
      const auto version = f.integer("version", 0, i64max);
      if (version != 1) {
        bad(path, line, fmt::format("format version {} is not one this doctor reads (1)", version));
      }
      d.process_rank = static_cast<int>(f.integer("process_rank", -1, max_ranks));
      d.pid = f.integer("pid", 0, i64max);
      d.host = f.str("host");
      d.reason = f.str("reason");
      d.time_ns = f.integer("time_ns", 0, i64max);
      header = true;
    } else if (type == "comm") {
      comm_info c;
      c.comm = f.str("comm");
      c.instance = static_cast<int>(f.integer("instance", 0, 1 << 30));
      c.size = static_cast<int>(f.integer("size", 1, max_ranks));
      c.rank = static_cast<int>(f.integer("rank", 0, c.size - 1));
      c.backend = f.str("backend");
      c.started = f.unsigned_integer("started");
      d.comms.push_back(std::move(c));
    } else if (type == "record") {
      record r;
      r.comm = f.str("comm");
      r.instance = static_cast<int>(f.integer("instance", 0, 1 << 30));
      r.size = static_cast<int>(f.integer("size", 1, max_ranks));
      r.rank = static_cast<int>(f.integer("rank", 0, r.size - 1));
      r.seq = f.unsigned_integer("seq");
      r.kind = f.str("kind");
      if (!known_kinds.count(r.kind)) bad(path, line, fmt::format("unknown kind '{}'", r.kind));
      r.dtype = f.str("dtype");
      r.op = f.str("op");
      r.count = f.unsigned_integer("count");
      r.root = static_cast<int>(f.integer("root", -1, max_ranks));
      r.algorithm = f.str("algorithm");
      r.state = f.str("state");
      if (!known_states.count(r.state)) bad(path, line, fmt::format("unknown state '{}'", r.state));
      r.start_ns = f.integer("start_ns", 0, i64max);
      r.end_ns = f.integer("end_ns", 0, i64max);
      r.wait_peer = static_cast<int>(f.integer("wait_peer", -1, max_ranks));
      r.wait_tag = static_cast<int>(f.integer("wait_tag", -1, std::numeric_limits<int>::max()));
      r.wait_since_ns = f.integer("wait_since_ns", 0, i64max);
      r.file = index;
      d.records.push_back(std::move(r));
    } else {
      bad(path, line, fmt::format("unknown line type '{}'", type));
    }
  }
  if (in.bad()) throw load_error(fmt::format("{}: read error", path));
  if (!header) throw load_error(fmt::format("{}: empty: no header line", path));
  return d;
}

std::vector<std::string> expand_paths(const std::vector<std::string>& args) {
  std::vector<std::string> out;
  for (const auto& a : args) {
    std::error_code ec;
    if (fs::is_directory(a, ec)) {
      std::vector<std::string> found;
      for (const auto& e : fs::directory_iterator(a, ec)) {
        const std::string name = e.path().filename().string();
        if (name.rfind("ringflow-flight.", 0) == 0 && name.size() > 6 &&
            name.substr(name.size() - 6) == ".jsonl") {
          found.push_back(e.path().string());
        }
      }
      if (ec) throw load_error(fmt::format("{}: cannot list: {}", a, ec.message()));
      if (found.empty()) {
        throw load_error(fmt::format("{}: no ringflow-flight.*.jsonl dumps in this directory", a));
      }
      std::sort(found.begin(), found.end());
      out.insert(out.end(), found.begin(), found.end());
    } else if (fs::exists(a, ec)) {
      out.push_back(a);
    } else {
      throw load_error(fmt::format("{}: no such file or directory", a));
    }
  }
  return out;
}

report diagnose(const std::vector<dump>& dumps) {
  using key = std::pair<std::string, int>;  // (comm, instance)
  // Per communicator and rank, the records from the newest dump that has them.
  std::map<key, std::map<int, std::size_t>> source;  // -> file index
  std::map<key, comm_info> info;
  for (std::size_t i = 0; i < dumps.size(); ++i) {
    for (const auto& c : dumps[i].comms) {
      const key k{c.comm, c.instance};
      auto& slot = source[k];
      auto it = slot.find(c.rank);
      if (it == slot.end() || dumps[it->second].time_ns < dumps[i].time_ns) slot[c.rank] = i;
      if (!info.count(k)) info[k] = c;
    }
  }
  report rep;
  for (const auto& [k, ranks] : source) {
    comm_report cr;
    cr.comm = k.first;
    cr.instance = k.second;
    cr.size = info[k].size;
    cr.backend = info[k].backend;
    // seq -> call description -> ranks
    std::map<std::uint64_t, std::map<std::string, std::vector<int>>> calls;
    for (const auto& [rank, file] : ranks) {
      rank_state rs;
      rs.rank = rank;
      rs.file = file;
      for (const auto& c : dumps[file].comms) {
        if (c.comm == k.first && c.instance == k.second && c.rank == rank) rs.started = c.started;
      }
      bool any = false;
      for (const auto& r : dumps[file].records) {
        if (r.comm != k.first || r.instance != k.second || r.rank != rank) continue;
        calls[r.seq][call_of(r)].push_back(rank);
        if (!any || r.seq >= rs.highest) {
          rs.highest = r.seq;
          any = true;
          rs.in_flight.reset();
          if (r.state == "running" || r.state == "failed") rs.in_flight = r;
        }
        if (r.state == "done" && (!rs.last_done || r.seq > *rs.last_done)) rs.last_done = r.seq;
        if (r.state == "failed" &&
            std::find(cr.failed.begin(), cr.failed.end(), rank) == cr.failed.end()) {
          cr.failed.push_back(rank);
        }
      }
      rs.any = any;
      if (any) cr.front = std::max(cr.front, rs.highest);
      cr.ranks.push_back(std::move(rs));
    }
    const bool used =
        std::any_of(cr.ranks.begin(), cr.ranks.end(), [](const rank_state& rs) { return rs.any; });
    if (!used) continue;  // a communicator that ran no collective: nothing to say
    for (int r = 0; r < cr.size; ++r) {
      if (!ranks.count(r)) cr.missing.push_back(r);
    }
    for (const auto& rs : cr.ranks) {
      if (!rs.any || rs.highest < cr.front) cr.behind.push_back(rs.rank);
    }
    for (auto& [seq, by_call] : calls) {
      if (by_call.size() < 2) continue;
      disagreement d;
      d.seq = seq;
      for (auto& [call, rs] : by_call) {
        std::sort(rs.begin(), rs.end());
        d.calls.emplace_back(call, rs);
      }
      std::sort(d.calls.begin(), d.calls.end(),
                [](const auto& a, const auto& b) { return a.second < b.second; });
      cr.disagreements.push_back(std::move(d));
    }
    // Who waits on whom in the front collective.
    std::map<int, const record*> at_front;
    std::map<int, std::int64_t> started_front;
    for (const auto& rs : cr.ranks) {
      for (const auto& r : dumps[rs.file].records) {
        if (r.comm != k.first || r.instance != k.second || r.rank != rs.rank || r.seq != cr.front) {
          continue;
        }
        started_front[rs.rank] = r.start_ns;
        at_front[rs.rank] = &r;
      }
    }
    if (!started_front.empty()) {
      std::int64_t first = std::numeric_limits<std::int64_t>::max();
      for (const auto& [rank, t] : started_front) first = std::min(first, t);
      for (const auto& [rank, t] : started_front) {
        if (t - first > late_after_ns) cr.late.emplace_back(rank, t - first);
      }
    }
    std::map<int, int> waits_on;
    for (const auto& [rank, r] : at_front) {
      if (r->state == "done" || r->wait_peer < 0 || r->wait_since_ns == 0) continue;
      // A late rank's own waits came after the others had given up on it.
      const bool is_late = std::any_of(cr.late.begin(), cr.late.end(),
                                       [&](const auto& l) { return l.first == rank; });
      if (is_late) continue;
      // A wait that began after its peer's collective had already failed
      // is the aftermath, not the cause.
      const auto peer = at_front.find(r->wait_peer);
      if (peer != at_front.end() && peer->second->end_ns != 0 &&
          r->wait_since_ns > peer->second->end_ns) {
        continue;
      }
      waits_on[rank] = r->wait_peer;
    }
    // The longest chain (ties: from the lowest rank); stops at a repeat.
    for (const auto& [from, to] : waits_on) {
      std::vector<int> chain{from};
      std::set<int> seen{from};
      int at = to;
      for (;;) {
        chain.push_back(at);  // a repeat closes a cycle
        if (seen.count(at)) break;
        seen.insert(at);
        const auto next = waits_on.find(at);
        if (next == waits_on.end()) break;
        at = next->second;
      }
      if (chain.size() > cr.wait_chain.size()) cr.wait_chain = chain;
    }
    cr.problem = !cr.late.empty() || !cr.missing.empty() || !cr.behind.empty() ||
                 !cr.failed.empty() || !cr.disagreements.empty();
    rep.problem = rep.problem || cr.problem;
    rep.comms.push_back(std::move(cr));
  }
  return rep;
}

std::string render(const report& rep, const std::vector<dump>& dumps) {
  std::string out;
  std::set<std::string> reasons;
  for (const auto& d : dumps) reasons.insert(d.reason);
  out += fmt::format("ringflow-doctor: {} dump file{}, {} communicator{}; dumped because: {}\n",
                     dumps.size(), dumps.size() == 1 ? "" : "s", rep.comms.size(),
                     rep.comms.size() == 1 ? "" : "s", fmt::join(reasons, " | "));
  for (const auto& c : rep.comms) {
    out += fmt::format("\ncommunicator {}{} ({} ranks, {}):\n", c.comm,
                       c.instance ? fmt::format(" #{}", c.instance) : "", c.size, c.backend);
    for (const auto& rs : c.ranks) {
      const dump& d = dumps[rs.file];
      std::string line = fmt::format("  rank {}: ", rs.rank);
      line += !rs.any        ? std::string("no collective recorded")
              : rs.last_done ? fmt::format("last completed #{}", *rs.last_done)
                             : std::string("none completed");
      if (rs.in_flight) {
        const record& r = *rs.in_flight;
        line += fmt::format("; {} #{} {} algorithm {}", r.state == "failed" ? "failed in" : "in",
                            r.seq, describe(r), r.algorithm.empty() ? "-" : r.algorithm);
        if (r.state == "running" && d.time_ns > r.start_ns) {
          line += fmt::format(" for {}", seconds(d.time_ns - r.start_ns));
        }
        if (r.wait_since_ns != 0) {
          if (r.wait_peer >= 0) {
            line += fmt::format(", waiting on rank {}", r.wait_peer);
          } else {
            line += ", waiting on all ranks";
          }
          if (r.wait_tag >= 0) line += fmt::format(" (tag {})", r.wait_tag);
          if (r.state == "running" && d.time_ns > r.wait_since_ns) {
            line += fmt::format(" for {}", seconds(d.time_ns - r.wait_since_ns));
          }
        }
      } else {
        line += "; no collective in flight";
      }
      line += fmt::format("  [{}]", d.path);
      out += line + "\n";
    }
    if (!c.missing.empty()) {
      out += fmt::format(
          "  no dump from {} (dead before it could write one, or its file was not "
          "given)\n",
          rank_list(c.missing));
    }
    if (!c.behind.empty()) {
      // What the ranks at the front are in, for the behind ranks to catch up to.
      std::vector<int> ahead;
      const record* front_rec = nullptr;
      for (const auto& rs : c.ranks) {
        if (rs.any && rs.highest == c.front) {
          ahead.push_back(rs.rank);
          for (const auto& r : dumps[rs.file].records) {
            if (r.comm == c.comm && r.instance == c.instance && r.rank == rs.rank &&
                r.seq == c.front && front_rec == nullptr) {
              front_rec = &r;
            }
          }
        }
      }
      for (int b : c.behind) {
        const auto& rs = *std::find_if(c.ranks.begin(), c.ranks.end(),
                                       [&](const rank_state& s) { return s.rank == b; });
        const bool stuck_in_own = rs.in_flight && rs.in_flight->state == "running";
        if (!rs.any) {
          out += fmt::format(
              "  BEHIND: rank {} has run no collective on this communicator while "
              "{} {} in #{}\n",
              b, rank_list(ahead), ahead.size() == 1 ? "is" : "are", c.front);
          continue;
        }
        out += fmt::format(
            "  BEHIND: rank {} is at #{} ({}) while {} {} in #{}{}\n", b, rs.highest,
            stuck_in_own ? "still running it"
                         : (rs.in_flight ? "it failed" : "done, and has not started the next"),
            rank_list(ahead), ahead.size() == 1 ? "is" : "are", c.front,
            front_rec ? fmt::format(" {} algorithm {}", describe(*front_rec),
                                    front_rec->algorithm.empty() ? "-" : front_rec->algorithm)
                      : "");
      }
      std::uint64_t lowest = c.front;
      bool none = false;
      for (int b : c.behind) {
        const auto& rs = *std::find_if(c.ranks.begin(), c.ranks.end(),
                                       [&](const rank_state& s) { return s.rank == b; });
        if (!rs.any) none = true;
        lowest = std::min(lowest, rs.highest);
      }
      out += fmt::format(
          "  -> look at what {} does {}: it is stuck outside ringflow (computing, "
          "stopped, dead) or took another path\n",
          rank_list(c.behind),
          none ? std::string("before its first collective")
               : fmt::format("after collective #{}", lowest));
    }
    if (c.wait_chain.size() >= 2) {
      std::string chain;
      for (std::size_t i = 0; i < c.wait_chain.size(); ++i) {
        chain += fmt::format("{}rank {}", i ? " -> " : "", c.wait_chain[i]);
      }
      const int end = c.wait_chain.back();
      const bool cycle =
          std::find(c.wait_chain.begin(), c.wait_chain.end() - 1, end) != c.wait_chain.end() - 1;
      out += fmt::format(
          "  WAITS at #{}: {}{}\n", c.front, chain,
          cycle ? " (a cycle)"
                : fmt::format(" (rank {} waits on no one in #{}: look there first)", end, c.front));
    }
    for (const auto& [rank, lag] : c.late) {
      out += fmt::format(
          "  LATE: rank {} started #{} {} after the first rank did (it was stopped, "
          "busy or slow before it)\n",
          rank, c.front, seconds(lag));
    }
    for (const auto& d : c.disagreements) {
      std::string line = fmt::format("  DISAGREE at #{}: ", d.seq);
      for (std::size_t i = 0; i < d.calls.size(); ++i) {
        if (i) line += "; ";
        line += fmt::format("{} called {}", rank_list(d.calls[i].second), d.calls[i].first);
      }
      out += line + "\n";
    }
    if (!c.failed.empty()) {
      std::vector<int> f = c.failed;
      std::sort(f.begin(), f.end());
      out += fmt::format("  FAILED: a collective failed on {}\n", rank_list(f));
    }
    if (!c.problem) {
      out += fmt::format("  ok: every rank reached #{} and all agree\n", c.front);
    }
  }
  out += rep.problem ? "\nverdict: problem found (see BEHIND / LATE / DISAGREE / FAILED above)\n"
                     : "\nverdict: no problem found\n";
  return out;
}

}  // namespace ringflow::doctor
