// compress_bench: encode + decode GB/s of every compressor on this CPU, with
// payload bytes, compression ratio and ring bytes sent per rank, as a
// Markdown table (the one in docs/compression.md).
//
//   compress_bench [--elements N] [--ranks P] [--reps R] [--only spec,...]
#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <string>
#include <string_view>
#include <vector>

#include "ringflow/compress/compressor.hpp"
#include "ringflow/compress/kernels.hpp"

using namespace ringflow::compress;

namespace {
double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

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

[[noreturn]] void usage(const char* msg) {
  fmt::print(stderr, "compress_bench: {}\nusage: compress_bench [--elements N] [--ranks P] "
                     "[--reps R] [--only spec,...]\n", msg);
  std::exit(2);
}
}  // namespace

int main(int argc, char** argv) {
  std::size_t n = std::size_t{1} << 22;  // 16 MiB of fp32: a typical DDP bucket
  int ranks = 4, reps = 7;
  std::vector<std::string> specs{"none", "fp16", "bf16", "int8", "topk:0.01", "topk:0.001",
                                 "sign", "powersgd:1", "powersgd:4"};
  for (int i = 1; i < argc; ++i) {
    const std::string_view a = argv[i];
    if (i + 1 >= argc) usage("missing value");
    if (a == "--elements") n = std::strtoull(argv[++i], nullptr, 10);
    else if (a == "--ranks") ranks = std::atoi(argv[++i]);
    else if (a == "--reps") reps = std::atoi(argv[++i]);
    else if (a == "--only") specs = split(argv[++i]);
    else usage("unknown flag");
  }
  if (n == 0 || ranks < 1 || reps < 1) usage("bad value");

  std::vector<float> x(n), out(n);
  const auto key = kernels::stream_key(3, 0, 0);
  for (std::size_t i = 0; i < n; ++i) x[i] = (kernels::uniform01(key, i) * 2 - 1) * 1e-2f;

  fmt::print("compress_bench: {} fp32 elements ({:.1f} MiB), bytes sent for {} ranks, median of {} "
             "runs\n\n", n, 4.0 * static_cast<double>(n) / (1 << 20), ranks, reps);
  fmt::print("| compressor | payload bytes | ratio | bytes sent / rank | encode GB/s | decode GB/s | "
             "encode+decode GB/s |\n|---|---:|---:|---:|---:|---:|---:|\n");
  using clock = std::chrono::steady_clock;
  for (const std::string& spec : specs) {
    auto c = make_compressor(spec, 1);
    std::vector<std::byte> payload(c->payload_bytes(n));
    std::vector<double> te, td;
    for (int r = 0; r <= reps; ++r) {
      const auto t0 = clock::now();
      c->encode(x, payload, 0);
      const auto t1 = clock::now();
      c->decode(payload, out);
      const auto t2 = clock::now();
      if (r == 0) continue;  // warm-up
      te.push_back(std::chrono::duration<double>(t1 - t0).count());
      td.push_back(std::chrono::duration<double>(t2 - t1).count());
    }
    std::size_t sent = 0;
    for (const auto& w : c->wire_plan(n, ranks)) sent += ring_bytes_sent(w, ranks, 0);
    const double bytes = 4.0 * static_cast<double>(n);
    const double e = median(te), d = median(td);
    fmt::print("| {} | {} | {:.2f} | {} | {:.2f} | {:.2f} | {:.2f} |\n", c->name(),
               c->payload_bytes(n), bytes / static_cast<double>(c->payload_bytes(n)), sent,
               bytes / e / 1e9, bytes / d / 1e9, bytes / (e + d) / 1e9);
  }
  return 0;
}
