// ringflow-sim: predicted data-parallel step time with and without each
// compressor, from the alpha-beta link model and codec speeds measured on
// this CPU (see docs/compression.md, "Deciding").
//
//   ringflow-sim --params 25.6e6 --bucket-mb 25 --ranks 16 --link-gbps 10
#include <fmt/format.h>

#include <algorithm>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "ringflow/compress/decide.hpp"
#include "ringflow/core/error.hpp"
#include "tool_flags.hpp"

using namespace ringflow::compress;

namespace {
std::vector<std::string> split(std::string_view s) {
  std::vector<std::string> out;
  while (!s.empty()) {
    const auto c = s.find(',');
    out.emplace_back(s.substr(0, c));
    if (c == std::string_view::npos) break;
    s.remove_prefix(c + 1);
  }
  return out;
}

// Bounds that keep a run to seconds: codec speed measured on at most 2^24
// elements, at most 2^20 buckets (each bucket is predicted one by one).
constexpr std::size_t max_calibrate = std::size_t{1} << 24;
constexpr std::size_t max_buckets = std::size_t{1} << 20;

constexpr const char* help = R"(ringflow-sim: predicted step time with and without compression

  --params N         model parameters (fp32 gradients), default 25.6e6 (ResNet-50);
                     whole number in [1, 1e12]
  --bucket-mb M      gradient bucket size in MiB, in (0, 65536], default 25; at
                     most 2^20 buckets (params / bucket)
  --buckets a,b,...  explicit bucket sizes in elements, each in [1, 2^30], at
                     most 2^20 of them (overrides the two above)
  --ranks P          data-parallel ranks, in [1, 2^20], default 16
  --link-gbps G      link bandwidth in Gb/s, in (0, 1e6], default 10
  --alpha-us A       per-message latency in microseconds, in [0, 1e6], default 20
  --cost-model       take alpha and beta from the collectives' calibrated cost
                     model of this machine (inter-node link) instead
  --compute-ms C     forward+backward time per step, added to every row (no
                     overlap modelled), in [0, 1e7], default 0
  --compressors s,.. default none,fp16,bf16,int8,topk:0.01,sign,powersgd:4,auto
  --auto-from s,..   candidates of the auto row, default bf16,int8
  --calibrate N      elements used to measure codec speed, in [1, 2^24],
                     default 1048576
A bad flag value prints one line naming the flag and its range; exit status 2.
)";
}  // namespace

int main(int argc, char** argv) try {
  double params = 25.6e6, bucket_mb = 25, gbps = 10, alpha_us = 20, compute_ms = 0;
  int ranks = 16;
  bool use_cost_model = false;
  std::size_t calib = std::size_t{1} << 20;
  std::vector<std::size_t> buckets;
  std::vector<std::string> specs{"none",      "fp16", "bf16",       "int8",
                                 "topk:0.01", "sign", "powersgd:4", "auto"};
  std::vector<std::string> auto_from{"bf16", "int8"};
  try {
    ringflow::tool_flags::reader args(argc, argv);
    while (args.next()) {
      if (args.is("-h", "--help")) {
        fmt::print("{}", help);
        return 0;
      }
      if (args.is("--cost-model")) {
        args.no_value();
        use_cost_model = true;
      } else if (args.is("--params")) {
        params = static_cast<double>(args.count(1, 1'000'000'000'000));
      } else if (args.is("--bucket-mb")) {
        bucket_mb = args.number(0, 65536, /*lo_open=*/true);
      } else if (args.is("--ranks")) {
        ranks = static_cast<int>(args.integer(1, 1 << 20));
      } else if (args.is("--link-gbps")) {
        gbps = args.number(0, 1e6, /*lo_open=*/true);
      } else if (args.is("--alpha-us")) {
        alpha_us = args.number(0, 1e6);
      } else if (args.is("--compute-ms")) {
        compute_ms = args.number(0, 1e7);
      } else if (args.is("--calibrate")) {
        calib = args.count(1, max_calibrate);
      } else if (args.is("--compressors")) {
        specs = split(args.text());
      } else if (args.is("--auto-from")) {
        auto_from = split(args.text());
      } else if (args.is("--buckets")) {
        buckets.clear();
        for (long long b : args.integers(1, 1 << 30, max_buckets)) {
          buckets.push_back(static_cast<std::size_t>(b));
        }
      } else {
        args.unknown();
      }
    }
    if (buckets.empty()) {
      const auto total = static_cast<std::size_t>(params);
      const auto per =
          std::max<std::size_t>(1, static_cast<std::size_t>(bucket_mb * (1 << 20) / 4));
      if (total / per >= max_buckets) {
        throw ringflow::tool_flags::bad_flag(fmt::format(
            "--params {} in buckets of --bucket-mb {} makes {} buckets, more than {}; use larger "
            "buckets",
            total, bucket_mb, (total + per - 1) / per, max_buckets));
      }
      for (std::size_t done = 0; done < total; done += per)
        buckets.push_back(std::min(per, total - done));
    }
  } catch (const ringflow::tool_flags::bad_flag& e) {
    return ringflow::tool_flags::report("ringflow-sim", e);
  }
  std::size_t total = 0;
  for (auto b : buckets) total += b;
  const link_model link = use_cost_model ? link_model::from_cost_model(ringflow::local_cost_model())
                                         : link_model::from_gbps(gbps, alpha_us);
  if (use_cost_model) {
    gbps = 8.0 / link.beta_s_per_byte / 1e9;
    alpha_us = link.alpha_s * 1e6;
  }

  // Measure every compressor that appears (auto's candidates included) once.
  std::map<std::string, codec_speed> speed;
  for (const auto& s : specs) {
    if (s != "auto") speed[s] = {};
  }
  for (const auto& s : auto_from) speed[s] = {};
  for (auto& [s, sp] : speed) {
    auto c = make_compressor(s);
    sp = measure_codec(*c, calib);
  }
  auto_policy pol(link, ranks, auto_from);
  for (const auto& s : auto_from) pol.set_speed(s, speed[s]);

  fmt::print(
      "ringflow-sim: {} parameters in {} buckets, {} ranks, {:.4g} Gb/s, alpha {:.3g} us, compute "
      "{} ms; codecs measured on this CPU with {} elements\n\n",
      total, buckets.size(), ranks, gbps, alpha_us, compute_ms, calib);
  fmt::print(
      "| compressor | enc GB/s | dec GB/s | sent MB/rank | wire ms | codec ms | step ms | "
      "vs none |\n|---|---:|---:|---:|---:|---:|---:|---:|\n");
  double none_ms = 0;
  for (const auto& s : specs) {
    double wire = 0, codec = 0, sent = 0;
    std::map<std::string, int> picks;
    for (std::size_t n : buckets) {
      const std::string use = s == "auto" ? pol.choose(n) : s;
      if (s == "auto") ++picks[use];
      auto c = make_compressor(use);
      const auto pr = predict(*c, n, ranks, link, speed.count(use) ? speed[use] : codec_speed{});
      wire += pr.wire_s;
      codec += pr.codec_s;
      for (const auto& w : c->wire_plan(n, ranks))
        sent += static_cast<double>(ring_bytes_sent(w, ranks, 0));
    }
    const double step_ms = compute_ms + 1e3 * (wire + codec);
    if (s == "none") none_ms = step_ms;
    std::string label = s;
    if (s == "auto") {
      label += " (";
      for (const auto& [k, v] : picks) label += fmt::format("{}x{} ", v, k);
      label.back() = ')';
    }
    const bool has_speed = speed.count(s) && s != "none";
    fmt::print("| {} | {} | {} | {:.1f} | {:.2f} | {:.2f} | {:.2f} | {} |\n", label,
               has_speed ? fmt::format("{:.2f}", speed[s].encode_gbps) : "-",
               has_speed ? fmt::format("{:.2f}", speed[s].decode_gbps) : "-", sent / 1e6,
               1e3 * wire, 1e3 * codec, step_ms,
               none_ms > 0 ? fmt::format("{:.2f}x", none_ms / step_ms) : "-");
  }
  return 0;
} catch (const ringflow::error& e) {
  // A bad --compressors / --auto-from spec, or an unusable cost model.
  fmt::print(stderr, "ringflow-sim: {}\n", e.what());
  return 2;
} catch (const std::exception& e) {
  fmt::print(stderr, "ringflow-sim: {}\n", e.what());
  return 1;
}
