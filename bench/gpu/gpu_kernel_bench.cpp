// gpu-kernel-bench: time of each fused compression kernel of
// ringflow/cuda/compress.hpp, and its bandwidth against a device-to-device copy
// measured in the same run. No Python needed (compare_torch.py adds PyTorch).
//
//   gpu-kernel-bench [--elements 16Mi,64Mi] [--reps 30] [--warmup 3] [--block 256]
//                    [--topk-ratio 0.01] [--seed 1234]
//
// Bytes counted are the fewest the math needs (every input read once, every
// output written once; n elements, B = block, k kept by top-k):
//   copy 8n; sign+EF 12n + n/8 + 4n/B; int8+EF 13n + 4n/B; top-k+EF 12n + 8k;
//   fp16/bf16+EF 14n; decode-add: payload + 8n (top-k: 16k). The allreduce's
//   pieces at 4 ranks: sign-sum4 (4 payloads decoded, summed, averaged into an
//   output only written) 4n + 4(n/8 + 4n/B); int8-shared4 (block max, then
//   quantize with the max-allreduced scales: two passes) 21n + 8n/B;
//   int8-avg4 (decode the summed payload, averaged, overwrite) 5n + 4n/B.
// %copy = achieved GB/s / copy GB/s (copy counted as read + write).
//
// Each call is timed alone with CUDA events on one stream, after the residual
// and the accumulator are restored and the L2 cache is flushed (untimed), so
// every kernel starts from the same data with a cold cache; the order of the
// kernels rotates every repetition; medians reported. Exits 77 without a GPU.
#include <cuda_runtime_api.h>
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <functional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "count_arg.hpp"
#include "ringflow/compress/kernels.hpp"
#include "ringflow/cuda/check.hpp"
#include "ringflow/cuda/compress.hpp"
#include "ringflow/cuda/device.hpp"
#include "ringflow/cuda/runtime.hpp"

namespace {

namespace rc = ringflow::cuda;
namespace kn = ringflow::compress::kernels;

struct options {
  std::vector<std::size_t> sizes{std::size_t{16} << 20, std::size_t{64} << 20};
  int reps = 30;
  int warmup = 3;
  std::size_t block = 256;
  double topk_ratio = 0.01;
  std::uint64_t seed = 1234;
};

[[noreturn]] void usage(const std::string& msg) {
  fmt::print(stderr,
             "gpu-kernel-bench: {}\nusage: gpu-kernel-bench [--elements 16Mi,64Mi] [--reps 30] "
             "[--warmup 3] [--block 256] [--topk-ratio 0.01] [--seed 1234]\n",
             msg);
  std::exit(2);
}

std::size_t parse_count(std::string_view s) {
  const auto v = ringflow::bench_gpu::parse_count(s);
  if (!v) usage("not a positive count: " + std::string(s));
  return *v;
}

options parse(int argc, char** argv) {
  options o;
  for (int i = 1; i < argc; ++i) {
    const std::string_view arg = argv[i];
    auto value = [&]() -> std::string_view {
      if (i + 1 >= argc) usage(std::string(arg) + " needs a value");
      return argv[++i];
    };
    if (arg == "--elements") {
      o.sizes.clear();
      std::string_view list = value();
      while (!list.empty()) {
        const auto comma = list.find(',');
        o.sizes.push_back(parse_count(list.substr(0, comma)));
        if (comma == std::string_view::npos) break;
        list.remove_prefix(comma + 1);
      }
    } else if (arg == "--reps") {
      o.reps = static_cast<int>(parse_count(value()));
    } else if (arg == "--warmup") {
      o.warmup = std::atoi(std::string(value()).c_str());
    } else if (arg == "--block") {
      o.block = parse_count(value());
    } else if (arg == "--topk-ratio") {
      o.topk_ratio = std::atof(std::string(value()).c_str());
    } else if (arg == "--seed") {
      o.seed = parse_count(value());
    } else if (arg == "-h" || arg == "--help") {
      fmt::print(
          "usage: gpu-kernel-bench [--elements 16Mi,64Mi] [--reps 30] [--warmup 3] "
          "[--block 256] [--topk-ratio 0.01] [--seed 1234]\n");
      std::exit(0);
    } else {
      usage("unknown argument " + std::string(arg));
    }
  }
  if (o.block == 0 || o.block % 32 != 0) usage("--block must be a positive multiple of 32");
  if (!(o.topk_ratio > 0.0 && o.topk_ratio <= 1.0)) usage("--topk-ratio must be in (0, 1]");
  if (o.warmup < 0) usage("--warmup must be >= 0");
  if (o.sizes.empty()) usage("--elements needs at least one size");
  return o;
}

// Normal(0, sigma) values from the counter RNG (Box-Muller), so the top-k
// selection sees a realistic spread of magnitudes; never all zeros.
std::vector<float> normal_values(std::size_t n, std::uint64_t key, float sigma) {
  std::vector<float> v(n);
  for (std::size_t i = 0; i < n; i += 2) {
    const double u1 = 1.0 - static_cast<double>(kn::uniform01(key, i));  // (0, 1]
    const double u2 = static_cast<double>(kn::uniform01(key, i + 1));
    const double rad = std::sqrt(-2.0 * std::log(u1)) * sigma;
    v[i] = static_cast<float>(rad * std::cos(6.283185307179586 * u2));
    if (i + 1 < n) v[i + 1] = static_cast<float>(rad * std::sin(6.283185307179586 * u2));
  }
  return v;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const std::size_t m = v.size() / 2;
  return v.size() % 2 == 1 ? v[m] : 0.5 * (v[m - 1] + v[m]);
}

struct entry {
  std::string name;
  double bytes;  // the fewest bytes the math needs
  std::function<void(cudaStream_t)> run;
  std::vector<double> ms;
};

void upload(void* dst, const std::vector<float>& src, std::size_t n, cudaStream_t s) {
  RINGFLOW_CHECK_CUDA(
      cudaMemcpyAsync(dst, src.data(), n * sizeof(float), cudaMemcpyHostToDevice, s));
}

void run_size(const options& o, std::size_t n, const std::vector<float>& g_host,
              const std::vector<float>& r_host, const std::vector<float>& acc_host,
              std::size_t flush_bytes) {
  const std::size_t B = o.block;
  const std::size_t nb = rc::block_count(n, B);
  const std::size_t k = std::max<std::size_t>(
      1, static_cast<std::size_t>(std::ceil(o.topk_ratio * static_cast<double>(n))));
  const double dn = static_cast<double>(n);

  rc::stream s;
  rc::device_buffer<float> g(n), r0(n), r(n), copy_dst(n), acc0(n), acc(n);
  rc::device_buffer<float> sign_scales(nb), int8_scales(nb), topk_values(k);
  rc::device_buffer<std::uint32_t> words(rc::sign_word_count(n)), topk_indices(k);
  rc::device_buffer<std::int8_t> q(n);
  rc::device_buffer<std::uint16_t> fp16(n), bf16(n);
  const std::size_t ws_bytes = rc::topk_workspace_bytes(n, k);
  rc::device_buffer<unsigned char> ws(std::max<std::size_t>(ws_bytes, 1));
  rc::device_buffer<unsigned char> flush(flush_bytes);
  upload(g.data(), g_host, n, s);
  upload(r0.data(), r_host, n, s);
  upload(acc0.data(), acc_host, n, s);

  std::uint64_t step = 0;  // the random streams' call counter, one per encode
  const double dnb = static_cast<double>(nb), dk = static_cast<double>(k);
  std::vector<entry> entries;
  auto add = [&](std::string name, double bytes, std::function<void(cudaStream_t)> run) {
    entries.push_back({std::move(name), bytes, std::move(run), {}});
  };
  add("copy", 8 * dn, [&](cudaStream_t st) {
    RINGFLOW_CHECK_CUDA(
        cudaMemcpyAsync(copy_dst.data(), g.data(), 4 * n, cudaMemcpyDeviceToDevice, st));
  });
  add("sign+EF", 12 * dn + dn / 8 + 4 * dnb, [&](cudaStream_t st) {
    rc::sign_ef_encode(g.data(), r.data(), n, B, sign_scales.data(), words.data(), st);
  });
  add("sign-decode", 8 * dn + dn / 8 + 4 * dnb, [&](cudaStream_t st) {
    rc::sign_decode_add(sign_scales.data(), words.data(), n, B, acc.data(), st);
  });
  // The allgather side of the sign allreduce at 4 ranks: 4 payloads decoded,
  // summed and averaged into out in one pass (out only written).
  constexpr int sum_ranks = 4;
  const std::size_t sign_stride = rc::sign_payload_bytes(n, B);
  rc::device_buffer<unsigned char> sign_payloads(sum_ranks * sign_stride);
  add("sign-sum4", 4 * dn + sum_ranks * (dn / 8 + 4 * dnb), [&](cudaStream_t st) {
    rc::sign_decode_sum(sign_payloads.data(), sign_stride, sum_ranks, n, B, acc.data(), sum_ranks,
                        st);
  });
  add("int8+EF", 13 * dn + 4 * dnb, [&](cudaStream_t st) {
    rc::int8_ef_encode(g.data(), r.data(), n, B, kn::stream_key(o.seed, ++step, 0),
                       int8_scales.data(), q.data(), st);
  });
  // The shared-scale int8 of the allreduce: two passes because the scales'
  // max-allreduce sits between them (levels 31 = 127 / 4 ranks).
  add("int8-shared4", 21 * dn + 8 * dnb, [&](cudaStream_t st) {
    rc::int8_block_absmax(g.data(), r.data(), n, B, int8_scales.data(), st);
    rc::int8_ef_quantize(g.data(), r.data(), n, B, int8_scales.data(), 127 / sum_ranks,
                         kn::stream_key(o.seed, ++step, 0), q.data(), st);
  });
  add("int8-decode", 9 * dn + 4 * dnb, [&](cudaStream_t st) {
    rc::int8_decode_add(q.data(), int8_scales.data(), n, B, 127, acc.data(), st);
  });
  // The decode of the summed int8 payload with the averaging fused in.
  add("int8-avg4", 5 * dn + 4 * dnb, [&](cudaStream_t st) {
    rc::int8_decode(q.data(), int8_scales.data(), n, B, 127 / sum_ranks, acc.data(), sum_ranks, st);
  });
  add("topk+EF", 12 * dn + 8 * dk, [&](cudaStream_t st) {
    rc::topk_ef_encode(g.data(), r.data(), n, k,
                       kn::stream_key(o.seed, ++step, kn::topk_sample_stream), topk_indices.data(),
                       topk_values.data(), ws.data(), ws_bytes, st);
  });
  add("topk-decode", 16 * dk, [&](cudaStream_t st) {
    rc::topk_decode_add(topk_indices.data(), topk_values.data(), k, n, acc.data(), st);
  });
  struct half_kind {
    const char* name;
    rc::half_format format;
    std::uint16_t* out;
  };
  for (const half_kind h : {half_kind{"fp16", rc::half_format::fp16, fp16.data()},
                            half_kind{"bf16", rc::half_format::bf16, bf16.data()}}) {
    add(std::string(h.name) + "+EF", 14 * dn, [&, h](cudaStream_t st) {
      rc::half_ef_encode(h.format, g.data(), r.data(), n, h.out, st);
    });
    add(std::string(h.name) + "-decode", 10 * dn,
        [&, h](cudaStream_t st) { rc::half_decode_add(h.format, h.out, n, acc.data(), st); });
  }

  // Every encoder once, so the decoders read real payloads from the start;
  // the sign payload copied into the 4 slots sign-sum4 decodes.
  RINGFLOW_CHECK_CUDA(cudaMemcpyAsync(r.data(), r0.data(), 4 * n, cudaMemcpyDeviceToDevice, s));
  for (auto& e : entries) {
    if (e.name.ends_with("+EF")) e.run(s);
  }
  for (int i = 0; i < sum_ranks; ++i) {
    unsigned char* slot = sign_payloads.data() + static_cast<std::size_t>(i) * sign_stride;
    RINGFLOW_CHECK_CUDA(
        cudaMemcpyAsync(slot, sign_scales.data(), 4 * nb, cudaMemcpyDeviceToDevice, s));
    RINGFLOW_CHECK_CUDA(cudaMemcpyAsync(slot + 4 * nb, words.data(), 4 * rc::sign_word_count(n),
                                        cudaMemcpyDeviceToDevice, s));
  }
  s.synchronize();

  const std::size_t E = entries.size();
  std::vector<rc::event> starts, stops;
  for (std::size_t i = 0; i < E; ++i) {
    starts.emplace_back(true);
    stops.emplace_back(true);
  }
  for (int rep = -o.warmup; rep < o.reps; ++rep) {
    const std::size_t shift = static_cast<std::size_t>(rep + o.warmup) % E;
    for (std::size_t j = 0; j < E; ++j) {
      const std::size_t i = (j + shift) % E;
      RINGFLOW_CHECK_CUDA(cudaMemcpyAsync(r.data(), r0.data(), 4 * n, cudaMemcpyDeviceToDevice, s));
      RINGFLOW_CHECK_CUDA(
          cudaMemcpyAsync(acc.data(), acc0.data(), 4 * n, cudaMemcpyDeviceToDevice, s));
      RINGFLOW_CHECK_CUDA(cudaMemsetAsync(flush.data(), rep & 0xff, flush_bytes, s));
      starts[i].record(s);
      entries[i].run(s);
      stops[i].record(s);
    }
    s.synchronize();
    if (rep < 0) continue;
    for (std::size_t i = 0; i < E; ++i) {
      entries[i].ms.push_back(rc::event::elapsed_ms(starts[i], stops[i]));
    }
  }

  const double copy_ms = median(entries[0].ms);
  const double copy_gbps = entries[0].bytes / (copy_ms * 1e6);
  const bool big = 4 * n >= (std::size_t{64} << 20);
  for (auto& e : entries) {
    const double ms = median(e.ms);
    const double min_ms = *std::min_element(e.ms.begin(), e.ms.end());
    const double gbps = e.bytes / (ms * 1e6);
    const double pct = 100.0 * gbps / copy_gbps;
    std::string goal = "";
    if (e.name == "sign+EF" || e.name == "int8+EF") {
      goal = !big ? ">=80% (n/a <64 MiB)" : pct >= 80.0 ? ">=80%: met" : ">=80%: NOT met";
    }
    fmt::print("{:>10} {:>11} {:<12} {:>6.2f} {:>9.3f} {:>9.3f} {:>7.0f} {:>6.0f}%  {}\n", n, 4 * n,
               e.name, e.bytes / dn, ms, min_ms, gbps, pct, goal);
  }
  std::fflush(stdout);
}

}  // namespace

int main(int argc, char** argv) {
  const options o = parse(argc, argv);
  if (!rc::available()) {
    fmt::print("gpu-kernel-bench: no GPU visible (compiled_with_cuda={}): nothing to measure\n",
               rc::compiled_with_cuda());
    return 77;
  }
  try {
    const std::string name = rc::device_name(0);
    int l2 = 0;
    RINGFLOW_CHECK_CUDA(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, 0));
    const std::size_t flush_bytes =
        std::max<std::size_t>(2 * static_cast<std::size_t>(l2), std::size_t{64} << 20);
    const std::size_t nmax = *std::max_element(o.sizes.begin(), o.sizes.end());
    const auto g = normal_values(nmax, kn::stream_key(o.seed, 1, 0), 1.0f);
    const auto r = normal_values(nmax, kn::stream_key(o.seed, 2, 0), 0.1f);
    const auto acc = normal_values(nmax, kn::stream_key(o.seed, 3, 0), 1.0f);
    fmt::print(
        "# gpu-kernel-bench: {}, L2 {} MiB (flushed before each call), block {}, "
        "top-k ratio {}, median of {} reps\n",
        name, l2 >> 20, o.block, o.topk_ratio, o.reps);
    fmt::print(
        "# bytes/elt: the fewest bytes the math needs per element; %copy: GB/s against "
        "the device copy (8n bytes) of the same size\n#\n");
    fmt::print("{:>10} {:>11} {:<12} {:>6} {:>9} {:>9} {:>7} {:>7}  {}\n", "#elements", "size(B)",
               "kernel", "B/elt", "time(ms)", "min(ms)", "GB/s", "%copy", "goal");
    for (std::size_t n : o.sizes) run_size(o, n, g, r, acc, flush_bytes);
  } catch (const std::exception& e) {
    fmt::print(stderr, "gpu-kernel-bench: {}\n", e.what());
    return 1;
  }
  return 0;
}
