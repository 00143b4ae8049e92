// ringflow-bench output: the nccl-tests style table, CSV rows and the JSON document.
#include "report.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <string_view>

namespace ringflow::bench {
namespace {

constexpr std::size_t mib = std::size_t{1} << 20;

std::string json_string(std::string_view s) {
  std::string o = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') {
      o += '\\';
      o += c;
    } else if (static_cast<unsigned char>(c) < 0x20) {
      o += fmt::format("\\u{:04x}", static_cast<unsigned>(c));
    } else {
      o += c;
    }
  }
  return o + "\"";
}

std::string csv_field(std::string_view s) {
  if (s.find_first_of(",\"\n") == std::string_view::npos) return std::string(s);
  std::string o = "\"";
  for (char c : s) {
    if (c == '"') o += '"';
    o += c;
  }
  return o + "\"";
}

double median_of(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

}  // namespace

void rep_times::summarize() {
  if (reps_us.empty()) return;
  median_us = median_of(reps_us);
  min_us = *std::min_element(reps_us.begin(), reps_us.end());
  max_us = *std::max_element(reps_us.begin(), reps_us.end());
  std::vector<double> v = reps_us;
  std::sort(v.begin(), v.end());
  const double pos = 0.99 * static_cast<double>(v.size() - 1);
  const auto lo = static_cast<std::size_t>(pos);
  const std::size_t hi = std::min(lo + 1, v.size() - 1);
  p99_us = v[lo] + (v[hi] - v[lo]) * (pos - static_cast<double>(lo));
}

void table_printer::header() const {
  const run_info& i = info_;
  fmt::print(out_, "# ringflow-bench {}.{}.{}: {}, algo {}, {} ranks on {} host{}\n",
             RINGFLOW_VERSION_MAJOR, RINGFLOW_VERSION_MINOR, RINGFLOW_VERSION_PATCH, i.coll, i.algo,
             i.ranks, i.hosts, i.hosts == 1 ? "" : "s");
  fmt::print(out_, "# backend {}: {}\n", i.backend, i.mpi_library);
  fmt::print(out_, "# machine {}: {} cpus{}, {}\n", i.host, i.nproc,
             i.usable_cpus > 0 && static_cast<unsigned>(i.usable_cpus) != i.nproc
                 ? fmt::format(" (rank 0 may run on {})", i.usable_cpus)
                 : std::string(),
             i.cpu_model);
  fmt::print(out_, "# dtype {}, op {}{}, iters {}, warmup {}, reps {}, segment {} B{}, check {}\n",
             i.type, i.op, i.coll == "broadcast" ? fmt::format(", root {}", i.root) : "", i.iters,
             i.warmup, i.reps, i.segment_bytes, i.segment_default ? " (default)" : "",
             i.check ? "on" : "off");
  fmt::print(out_,
             "# time = median over reps of the mean of {} iterations (slowest rank); "
             "busbw = algbw * {}\n",
             i.iters, i.bus_factor_text);
  if (!i.baseline_call.empty()) {
    fmt::print(out_,
               "# baseline {} (out of place, same buffers) interleaved rep by rep: "
               "ringflow, mpi, ringflow, mpi, ...; ratio = ringflow busbw / mpi busbw\n",
               i.baseline_call);
  }
  if (i.checked_mode) {
    fmt::print(out_, "# RINGFLOW_CHECK is on: ringflow times include the fingerprint exchange\n");
  }
  fmt::print(out_, "#\n");
  // Three header lines: group labels, column names, units.
  std::string l0 = fmt::format("#{:41}", "");
  std::string l1 = fmt::format("#{:>11} {:>12} {:>9} {:>6}", "size", "count", "type", "redop");
  std::string l2 = fmt::format("#{:>11} {:>12} {:>9} {:>6}", "(B)", "(elements)", "", "");
  auto side = [&](const std::string& label) {
    const std::size_t width = i.extended ? 54 : 34;
    l0 += fmt::format("  {:^{}}", label, width - 2);
    l1 += fmt::format("  {:>9} {:>7} {:>7} {:>6}", "time", "algbw", "busbw", "#wrong");
    l2 += fmt::format("  {:>9} {:>7} {:>7} {:>6}", "(us)", "(GB/s)", "(GB/s)", "");
    if (i.extended) {
      l1 += fmt::format(" {:>9} {:>9} {:>9}", "min", "max", "p99");
      l2 += fmt::format(" {:>9} {:>9} {:>9}", "(us)", "(us)", "(us)");
    }
  };
  side(fmt::format("ringflow {}", i.algo));
  if (!i.baseline_call.empty()) {
    side(i.baseline_call);
    l1 += fmt::format(" {:>6}", "ratio");
    if (i.extended) l1 += fmt::format(" {:>6}", "paired");
  }
  for (std::string* l : {&l0, &l1, &l2}) l->erase(l->find_last_not_of(' ') + 1);
  fmt::print(out_, "{}\n", l0);
  fmt::print(out_, "{}\n{}\n", l1, l2);
  std::fflush(out_);
}

void table_printer::skipped(std::size_t bytes) const {
  fmt::print(out_, "# {} B skipped: less than one {} element per rank\n", bytes, info_.type);
  std::fflush(out_);
}

void table_printer::row(const size_result& r) const {
  std::string line =
      fmt::format("{:>12} {:>12} {:>9} {:>6}", r.shape.bytes, r.shape.count, info_.type, info_.op);
  auto side = [&](const side_result& s) {
    line += fmt::format("  {:>9.2f} {:>7.2f} {:>7.2f} {:>6}", s.time.median_us, s.algbw, s.busbw,
                        info_.check ? fmt::format("{}", s.wrong) : std::string("N/A"));
    if (info_.extended) {
      line +=
          fmt::format(" {:>9.2f} {:>9.2f} {:>9.2f}", s.time.min_us, s.time.max_us, s.time.p99_us);
    }
  };
  side(r.ringflow);
  if (r.has_baseline) {
    side(r.baseline);
    line += fmt::format(" {:>6.2f}", r.ratio);
    if (info_.extended) line += fmt::format(" {:>6.2f}", r.paired_ratio);
  }
  fmt::print(out_, "{}\n", line);
  std::fflush(out_);
}

void table_printer::footer(const std::vector<size_result>& rows) const {
  std::size_t wrong = 0, base_wrong = 0;
  double bus = 0;
  std::vector<double> ratios, paired;
  for (const auto& r : rows) {
    wrong += r.ringflow.wrong;
    base_wrong += r.baseline.wrong;
    bus += r.ringflow.busbw;
    if (r.has_baseline && r.shape.bytes >= mib) {
      ratios.push_back(r.ratio);
      paired.push_back(r.paired_ratio);
    }
  }
  fmt::print(out_, "#\n");
  if (info_.check) {
    fmt::print(out_, "# wrong elements: {} {}\n", wrong, wrong == 0 ? "OK" : "FAILED");
    if (!info_.baseline_call.empty()) {
      fmt::print(out_, "# wrong elements (mpi baseline): {}\n", base_wrong);
    }
  }
  if (!rows.empty()) {
    fmt::print(out_, "# avg busbw: {:.3f} GB/s\n", bus / static_cast<double>(rows.size()));
  }
  if (!ratios.empty()) {
    fmt::print(out_, "# ratio over sizes >= 1 MiB: min {:.3f}, median {:.3f}, max {:.3f}\n",
               *std::min_element(ratios.begin(), ratios.end()), median_of(ratios),
               *std::max_element(ratios.begin(), ratios.end()));
    if (info_.extended) {
      fmt::print(out_,
                 "# paired ratio over sizes >= 1 MiB: min {:.3f}, median {:.3f}, max {:.3f}\n",
                 *std::min_element(paired.begin(), paired.end()), median_of(paired),
                 *std::max_element(paired.begin(), paired.end()));
    }
  }
  std::fflush(out_);
}

void write_csv(std::FILE* out, const run_info& info, const std::vector<size_result>& rows) {
  const bool base = !info.baseline_call.empty();
  fmt::print(out, "bytes,algo,ranks,time_us,algbw_GBs,busbw_GBs,wrong");
  if (base) fmt::print(out, ",baseline_busbw_GBs,ratio");
  fmt::print(out, ",coll,type,op,count,p50_us,min_us,max_us,iters,reps,segment_bytes");
  if (base) {
    fmt::print(out,
               ",baseline,baseline_time_us,baseline_algbw_GBs,baseline_min_us,"
               "baseline_max_us,baseline_wrong,paired_ratio");
  }
  fmt::print(out, ",p99_us");
  if (base) fmt::print(out, ",baseline_p99_us");
  fmt::print(out, "\n");
  for (const auto& r : rows) {
    const auto& s = r.ringflow;
    fmt::print(out, "{},{},{},{:.3f},{:.6f},{:.6f},{}", r.shape.bytes, csv_field(info.algo),
               info.ranks, s.time.median_us, s.algbw, s.busbw,
               info.check ? fmt::format("{}", s.wrong) : std::string());
    if (base) fmt::print(out, ",{:.6f},{:.4f}", r.baseline.busbw, r.ratio);
    fmt::print(out, ",{},{},{},{},{:.3f},{:.3f},{:.3f},{},{},{}", info.coll, info.type, info.op,
               r.shape.count, s.time.median_us, s.time.min_us, s.time.max_us, info.iters, info.reps,
               info.segment_bytes);
    if (base) {
      const auto& b = r.baseline;
      fmt::print(out, ",{},{:.3f},{:.6f},{:.3f},{:.3f},{},{:.4f}", info.baseline_call,
                 b.time.median_us, b.algbw, b.time.min_us, b.time.max_us,
                 info.check ? fmt::format("{}", b.wrong) : std::string(), r.paired_ratio);
    }
    fmt::print(out, ",{:.3f}", s.time.p99_us);
    if (base) fmt::print(out, ",{:.3f}", r.baseline.time.p99_us);
    fmt::print(out, "\n");
  }
  std::fflush(out);
}

void write_json(std::FILE* out, const run_info& info, const std::vector<size_result>& rows) {
  auto reps = [](const rep_times& t) {
    std::string s = "[";
    for (std::size_t k = 0; k < t.reps_us.size(); ++k) {
      s += fmt::format("{}{:.3f}", k ? ", " : "", t.reps_us[k]);
    }
    return s + "]";
  };
  auto side = [&](const side_result& s) {
    return fmt::format(
        "{{\"time_us\": {:.3f}, \"min_us\": {:.3f}, \"max_us\": {:.3f}, \"p99_us\": {:.3f}, "
        "\"algbw_GBs\": {:.6f}, \"busbw_GBs\": {:.6f}, \"wrong\": {}, \"reps_us\": {}}}",
        s.time.median_us, s.time.min_us, s.time.max_us, s.time.p99_us, s.algbw, s.busbw,
        info.check ? fmt::format("{}", s.wrong) : std::string("null"), reps(s.time));
  };
  fmt::print(out, "{{\n  \"run\": {{\n");
  fmt::print(out, "    \"tool\": \"ringflow-bench\", \"version\": \"{}.{}.{}\",\n",
             RINGFLOW_VERSION_MAJOR, RINGFLOW_VERSION_MINOR, RINGFLOW_VERSION_PATCH);
  fmt::print(out, "    \"coll\": {}, \"algo\": {}, \"type\": {}, \"op\": {}, \"root\": {},\n",
             json_string(info.coll), json_string(info.algo), json_string(info.type),
             json_string(info.op), info.root);
  fmt::print(out,
             "    \"ranks\": {}, \"hosts\": {}, \"host\": {}, \"nproc\": {}, \"usable_cpus\": {}, "
             "\"cpu\": {},\n",
             info.ranks, info.hosts, json_string(info.host), info.nproc, info.usable_cpus,
             json_string(info.cpu_model));
  fmt::print(out, "    \"backend\": {}, \"mpi_library\": {},\n", json_string(info.backend),
             json_string(info.mpi_library));
  fmt::print(out,
             "    \"iters\": {}, \"warmup\": {}, \"reps\": {}, \"segment_bytes\": {}, "
             "\"check\": {}, \"bus_factor\": {},\n",
             info.iters, info.warmup, info.reps, info.segment_bytes, info.check,
             json_string(info.bus_factor_text));
  fmt::print(out, "    \"baseline\": {}\n  }},\n  \"results\": [",
             info.baseline_call.empty() ? std::string("null") : json_string(info.baseline_call));
  for (std::size_t k = 0; k < rows.size(); ++k) {
    const auto& r = rows[k];
    fmt::print(out, "{}\n    {{\"bytes\": {}, \"count\": {}, \"ringflow\": {}", k ? "," : "",
               r.shape.bytes, r.shape.count, side(r.ringflow));
    if (r.has_baseline) {
      fmt::print(out, ",\n     \"baseline\": {}, \"ratio\": {:.4f}, \"paired_ratio\": {:.4f}",
                 side(r.baseline), r.ratio, r.paired_ratio);
    }
    fmt::print(out, "}}");
  }
  fmt::print(out, "\n  ]\n}}\n");
  std::fflush(out);
}

}  // namespace ringflow::bench
