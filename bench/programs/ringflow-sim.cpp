// ringflow-sim: predicted data-parallel step time with and without each
// compressor, from the alpha-beta link model and codec speeds measured on
// this CPU (see docs/compression.md, "Deciding").
//
//   ringflow-sim --params 25.6e6 --bucket-mb 25 --ranks 16 --link-gbps 10
#include <fmt/format.h>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "ringflow/compress/decide.hpp"
#include "ringflow/core/error.hpp"

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

double number(const char* flag, const char* text) {
  char* end = nullptr;
  const double v = std::strtod(text, &end);
  if (end == text || *end != '\0' || !(v >= 0)) {
    fmt::print(stderr, "ringflow-sim: {} needs a non-negative number, got '{}'\n", flag, text);
    std::exit(2);
  }
  return v;
}

constexpr const char* help = R"(ringflow-sim: predicted step time with and without compression

  --params N         model parameters (fp32 gradients), default 25.6e6 (ResNet-50)
  --bucket-mb M      gradient bucket size in MiB, default 25
  --buckets a,b,...  explicit bucket sizes in elements (overrides the two above)
  --ranks P          data-parallel ranks, default 16
  --link-gbps G      link bandwidth in Gb/s, default 10
  --alpha-us A       per-message latency in microseconds, default 20
  --cost-model       take alpha and beta from the collectives' calibrated cost
                     model of this machine (inter-node link) instead
  --compute-ms C     forward+backward time per step, added to every row (no
                     overlap modelled), default 0
  --compressors s,.. default none,fp16,bf16,int8,topk:0.01,sign,powersgd:4,auto
  --auto-from s,..   candidates of the auto row, default bf16,int8
  --calibrate N      elements used to measure codec speed, default 1048576
)";
}  // namespace

int main(int argc, char** argv) try {
  double params = 25.6e6, bucket_mb = 25, gbps = 10, alpha_us = 20, compute_ms = 0;
  int ranks = 16;
  bool use_cost_model = false;
  std::size_t calib = std::size_t{1} << 20;
  std::vector<std::size_t> buckets;
  std::vector<std::string> specs{"none", "fp16", "bf16", "int8", "topk:0.01", "sign",
                                 "powersgd:4", "auto"};
  std::vector<std::string> auto_from{"bf16", "int8"};
  for (int i = 1; i < argc; ++i) {
    const std::string_view a = argv[i];
    if (a == "-h" || a == "--help") {
      fmt::print("{}", help);
      return 0;
    }
    if (a == "--cost-model") {
      use_cost_model = true;
      continue;
    }
    if (i + 1 >= argc) {
      fmt::print(stderr, "ringflow-sim: {} needs a value\n{}", a, help);
      return 2;
    }
    const char* v = argv[++i];
    if (a == "--params") params = number("--params", v);
    else if (a == "--bucket-mb") bucket_mb = number("--bucket-mb", v);
    else if (a == "--ranks") ranks = static_cast<int>(number("--ranks", v));
    else if (a == "--link-gbps") gbps = number("--link-gbps", v);
    else if (a == "--alpha-us") alpha_us = number("--alpha-us", v);
    else if (a == "--compute-ms") compute_ms = number("--compute-ms", v);
    else if (a == "--calibrate") calib = static_cast<std::size_t>(number("--calibrate", v));
    else if (a == "--compressors") specs = split(v);
    else if (a == "--auto-from") auto_from = split(v);
    else if (a == "--buckets") {
      for (const auto& s : split(v)) buckets.push_back(static_cast<std::size_t>(number("--buckets", s.c_str())));
    } else {
      fmt::print(stderr, "ringflow-sim: unknown flag {}\n{}", a, help);
      return 2;
    }
  }
  if (ranks < 1 || calib < 1) {
    fmt::print(stderr, "ringflow-sim: --ranks and --calibrate must be >= 1\n");
    return 2;
  }
  if (buckets.empty()) {
    const auto total = static_cast<std::size_t>(params);
    const auto per = std::max<std::size_t>(1, static_cast<std::size_t>(bucket_mb * (1 << 20) / 4));
    for (std::size_t done = 0; done < total; done += per) buckets.push_back(std::min(per, total - done));
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

  fmt::print("ringflow-sim: {} parameters in {} buckets, {} ranks, {:.4g} Gb/s, alpha {:.3g} us, compute "
             "{} ms; codecs measured on this CPU with {} elements\n\n",
             total, buckets.size(), ranks, gbps, alpha_us, compute_ms, calib);
  fmt::print("| compressor | enc GB/s | dec GB/s | sent MB/rank | wire ms | codec ms | step ms | "
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
      for (const auto& w : c->wire_plan(n, ranks)) sent += static_cast<double>(ring_bytes_sent(w, ranks, 0));
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
  fmt::print(stderr, "ringflow-sim: {}\n", e.what());
  return 2;
}
