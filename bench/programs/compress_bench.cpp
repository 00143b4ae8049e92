// compress_bench: encode + decode GB/s of every compressor on this CPU, with
// payload bytes, compression ratio and ring bytes sent per rank, as a
// Markdown table (the one in docs/compression.md); with --train, the test
// accuracy of Fashion-MNIST data-parallel training through each compressor.
//
//   compress_bench [--elements N] [--ranks P] [--reps R] [--only spec,...] [--alpha-us A]
//   compress_bench --train [--ranks 4] [--epochs 3] [--only spec,...] [--limit N]
//   compress_bench --fp16-paths [--elements N] [--reps R]   (portable vs F16C, interleaved)
//   compress_bench --powersgd-layout [--reps R]   (flat vs per-layer on the MLP's big bucket)
#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <map>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

#include "ringflow/compress/compressor.hpp"
#include "ringflow/compress/cpu_codec.hpp"
#include "ringflow/compress/decide.hpp"
#include "ringflow/compress/half_codec.hpp"
#include "ringflow/compress/kernels.hpp"
#include "tool_flags.hpp"
#include <ringflow/ad/autodiff.hpp>
#include <ringflow/backends/local.hpp>
#include <ringflow/coll/collectives.hpp>
#include <ringflow/compress/bucket_compression.hpp>
#include <ringflow/data/batch.hpp>
#include <ringflow/data/dataset.hpp>
#include <ringflow/data/sampler.hpp>

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

constexpr const char* usage_text =
    "usage: compress_bench [--elements N] [--ranks P] [--reps R] [--only spec,...] [--alpha-us A]\n"
    "       compress_bench --train [--ranks P] [--epochs E] [--only spec,...] [--limit N] [--seed "
    "S]\n"
    "       compress_bench --fp16-paths [--elements N] [--reps R]\n"
    "       compress_bench --powersgd-layout [--reps R]\n"
    "Ranges: --elements [1, 2^27], --ranks [1, 128], --reps [1, 10000], --epochs [1, 1000],\n"
    "--limit [1, 10^7], --seed [0, 2^63-1], --alpha-us [0, 10^6] (link latency of the\n"
    "break-even column, default 20). A bad value exits with status 2.\n";

// A bad command line: one line on stderr, exit status 2 (no MPI here).
[[noreturn]] void usage(const std::string& msg) {
  std::exit(ringflow::tool_flags::report("compress_bench", ringflow::tool_flags::bad_flag(msg)));
}

namespace ad = ringflow::ad;
namespace rd = ringflow::data;
using clock_type = std::chrono::steady_clock;

// Thread CPU time: the machine is shared, so wall time mostly measures the others.
double thread_seconds() {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
}

// Test accuracy: rank r classifies slices r, r + P, ... and the counts are summed.
double accuracy(const ringflow::communicator& comm, ad::mlp& model, const rd::dataset& ds) {
  ad::no_grad guard;
  model.eval();
  const std::size_t slice = 500;
  std::array<double, 2> counts{0, 0};
  std::size_t k = 0;
  for (std::size_t begin = 0; begin < ds.size(); begin += slice, ++k) {
    if (static_cast<int>(k % static_cast<std::size_t>(comm.size())) != comm.rank()) continue;
    const std::size_t n = std::min(slice, ds.size() - begin);
    auto x = ad::tensor::from_data(
        ds.sample(begin), {static_cast<ad::index>(n), static_cast<ad::index>(ds.features())});
    const auto predicted = ad::argmax_rows(model(x));
    for (std::size_t i = 0; i < n; ++i) counts[0] += predicted[i] == ds.labels[begin + i] ? 1 : 0;
    counts[1] += static_cast<double>(n);
  }
  ringflow::allreduce(comm, std::span<double>(counts), ringflow::sum);
  model.train();
  return counts[0] / counts[1];
}

struct train_result {
  double accuracy = 0, step_ms = 0, reduce_ms = 0;
  std::int64_t steps = 0;
  ringflow::compress::traffic t;
  std::string picks;
};

// Synchronous data parallelism on thread ranks: forward, backward, then every
// 64 Ki-element bucket averaged through bucket_compression, then AdamW. The
// same MLP (784-256-128-10), schedule and batch as examples/train_fashion_mnist.
train_result train_with(const std::string& spec, const rd::train_test& fm, int ranks, int epochs,
                        std::uint64_t seed) {
  const std::size_t global_batch = 128,
                    local_batch = global_batch / static_cast<std::size_t>(ranks);
  train_result out;
  std::mutex m;
  ringflow::local::run(ranks, [&](ringflow::communicator& comm) {
    ad::mlp model({784, 256, 128, 10}, ad::activation::relu, seed);
    auto params = model.parameters();
    ad::adamw opt(params, {.lr = 1e-3, .weight_decay = 1e-4});
    rd::sampler sampler(fm.train.size(), comm.rank(), comm.size(), seed);
    const std::size_t steps_per_epoch = rd::batch_count(sampler.per_rank(), local_batch, true);
    const auto total = static_cast<std::int64_t>(steps_per_epoch) * epochs;
    const auto schedule = ad::warmup_cosine(1e-3, std::min<std::int64_t>(100, total / 10), total);
    ringflow::compress::bucket_compression bc(spec, {.seed = seed});
    const std::size_t cap = 64 * 1024;
    std::int64_t step = 0;
    double reduce_s = 0;
    const auto t0 = clock_type::now();
    for (int e = 0; e < epochs; ++e) {
      sampler.set_epoch(static_cast<std::uint64_t>(e));
      rd::prefetcher batches(fm.train, sampler.remaining(), local_batch,
                             {.depth = 0, .drop_last = true});
      rd::batch b;
      while (batches.next(b)) {
        opt.set_lr(schedule(step++));
        opt.zero_grad();
        auto x = ad::tensor::from_data(b.images.data(), {static_cast<ad::index>(b.size()),
                                                         static_cast<ad::index>(b.images.cols())});
        auto loss = ad::softmax_cross_entropy(model(x), std::span<const int>(b.labels));
        ad::backward(loss);
        const auto tr = clock_type::now();
        auto grads = params.all_grads();
        for (std::size_t off = 0, id = 0; off < grads.size(); off += cap, ++id) {
          bc.reduce(comm, grads.subspan(off, std::min(cap, grads.size() - off)), id);
        }
        reduce_s += std::chrono::duration<double>(clock_type::now() - tr).count();
        opt.step();
        sampler.advance(b.size());
      }
    }
    const double wall = std::chrono::duration<double>(clock_type::now() - t0).count();
    const double acc = accuracy(comm, model, fm.test);
    if (comm.rank() == 0) {
      std::lock_guard lock(m);
      out.accuracy = acc;
      out.steps = step;
      out.step_ms = 1e3 * wall / static_cast<double>(step);
      out.reduce_ms = 1e3 * reduce_s / static_cast<double>(step);
      out.t = bc.total();
      std::map<std::string, int> picks;
      for (std::size_t id = 0; !bc.spec_of(id).empty(); ++id) ++picks[bc.spec_of(id)];
      for (const auto& [k, v] : picks)
        out.picks += fmt::format("{}{}x{}", out.picks.empty() ? "" : " ", v, k);
    }
  });
  return out;
}

// The fp16 codec's two CPU paths side by side: each rep runs portable then
// F16C encode and decode-add on the same buffers (order alternating), so both
// see the same machine load; medians of thread CPU time and wall time.
int fp16_paths(const std::vector<float>& x, int reps) {
  const std::size_t n = x.size();
  std::vector<std::uint16_t> h(n);
  std::vector<float> out(n);
  const std::vector<fp16_path> all{fp16_path::portable, fp16_path::f16c};
  const bool have = best_fp16_path() == fp16_path::f16c;
  std::map<fp16_path, std::vector<double>> te, td, tw;
  for (int r = 0; r <= reps; ++r) {
    for (std::size_t k = 0; k < all.size(); ++k) {
      const fp16_path p = all[(k + static_cast<std::size_t>(r)) % all.size()];
      if (p == fp16_path::f16c && !have) continue;
      std::fill(out.begin(), out.end(), 0.0f);
      const auto w0 = clock_type::now();
      const double t0 = thread_seconds();
      encode_fp16(x, h, p);
      const double t1 = thread_seconds();
      decode_fp16(h, out, /*add=*/true, p);
      const double t2 = thread_seconds();
      const auto w1 = clock_type::now();
      if (r == 0) continue;  // warm-up
      te[p].push_back(t1 - t0);
      td[p].push_back(t2 - t1);
      tw[p].push_back(std::chrono::duration<double>(w1 - w0).count());
    }
  }
  const double bytes = 4.0 * static_cast<double>(n);
  fmt::print(
      "compress_bench --fp16-paths: {} fp32 elements, {} interleaved reps, medians; GB/s of "
      "fp32 input per thread CPU second (wall: per wall second)\n\n| path | encode GB/s | "
      "decode-add GB/s | encode+decode GB/s | encode+decode GB/s (wall) "
      "|\n|---|---:|---:|---:|---:|\n",
      n, reps);
  for (const fp16_path p : all) {
    if (te[p].empty()) continue;
    const double e = median(te[p]), d = median(td[p]), w = median(tw[p]);
    fmt::print("| {} | {:.2f} | {:.2f} | {:.2f} | {:.2f} |\n", to_string(p), bytes / e / 1e9,
               bytes / d / 1e9, bytes / (e + d) / 1e9, bytes / w / 1e9);
  }
  if (have) {
    // Within a rep both paths ran back to back: the median of those ratios
    // is the least disturbed by load that changes between reps.
    std::vector<double> ratio;
    for (std::size_t i = 0; i < te[fp16_path::f16c].size(); ++i) {
      ratio.push_back((te[fp16_path::portable][i] + td[fp16_path::portable][i]) /
                      (te[fp16_path::f16c][i] + td[fp16_path::f16c][i]));
    }
    fmt::print("\nf16c speed-up, encode+decode (CPU time): median of per-rep ratios {:.2f}x\n",
               median(ratio));
  } else {
    fmt::print("\nthis CPU has no F16C + AVX2: portable only\n");
  }
  return 0;
}

// PowerSGD's reduce() of the trainer's second default bucket of the MLP
// 784-256-128-10 (the 256x128 weight, 256 bias values, the 784x256 weight:
// 233728 elements) on one rank, flat (one 484 x 483 matrix) and per layer,
// interleaved; medians of thread CPU time.
int powersgd_layout(int reps) {
  const std::size_t n = 256 * 128 + 256 + 784 * 256;
  const bucket_layout layout{n, {{0, 256, 128}, {256 * 128, 1, 256}, {256 * 128 + 256, 784, 256}}};
  std::vector<float> x(n);
  const auto key = kernels::stream_key(5, 0, 0);
  for (std::size_t i = 0; i < n; ++i) x[i] = (kernels::uniform01(key, i) * 2 - 1) * 1e-2f;
  for (const int r : {4, 2}) {
    std::array<std::vector<double>, 2> t;
    std::array<std::size_t, 2> payload{};
    ringflow::local::run(1, [&](ringflow::communicator& comm) {
      powersgd_compressor flat(r, 1), per_layer(r, 1);
      per_layer.set_layout(layout);
      std::vector<float> g(n), mine(n);
      for (int rep = 0; rep <= reps; ++rep) {
        for (int k = 0; k < 2; ++k) {
          powersgd_compressor& c = (k + rep) % 2 == 0 ? flat : per_layer;
          const int which = &c == &flat ? 0 : 1;
          g = x;
          traffic st;
          const double t0 = thread_seconds();
          c.reduce(comm, g, mine, 0, st);
          const double t1 = thread_seconds();
          payload[static_cast<std::size_t>(which)] = st.payload_bytes;
          if (rep > 0) t[static_cast<std::size_t>(which)].push_back(t1 - t0);
        }
      }
    });
    fmt::print(
        "powersgd:{} reduce of a {}-element bucket on 1 rank: flat {:.3f} ms ({} payload "
        "bytes), per layer {:.3f} ms ({} payload bytes); median of {} interleaved reps\n",
        r, n, 1e3 * median(t[0]), payload[0], 1e3 * median(t[1]), payload[1], reps);
  }
  return 0;
}

int train_table(const std::vector<std::string>& specs, int ranks, int epochs, std::size_t limit,
                std::uint64_t seed) {
  if (128 % ranks != 0) usage("--ranks must divide the global batch of 128");
  auto fm = rd::load_fashion_mnist(rd::default_fashion_mnist_dir(), limit);
  rd::normalize(fm.train, rd::fashion_mnist_normalization);
  rd::normalize(fm.test, rd::fashion_mnist_normalization);
  fmt::print(
      "compress_bench --train: MLP 784-256-128-10 on Fashion-MNIST ({} train / {} test), {} "
      "thread ranks, global batch 128, {} epochs, AdamW 1e-3 warm-up + cosine, seed {}, "
      "64 Ki-element buckets\n\n",
      fm.train.size(), fm.test.size(), ranks, epochs, seed);
  fmt::print(
      "| compressor | test accuracy | vs none (points) | ratio | bytes sent / rank / step | "
      "step ms | reduce ms / step |\n|---|---:|---:|---:|---:|---:|---:|\n");
  double base = -1;
  for (const std::string& spec : specs) {
    const train_result r = train_with(spec, fm, ranks, epochs, seed);
    if (spec == "none") base = r.accuracy;
    fmt::print("| {}{} | {:.4f} | {} | {:.2f} | {:.0f} | {:.2f} | {:.2f} |\n", spec,
               spec == "auto" ? " (" + r.picks + ")" : "", r.accuracy,
               base >= 0 ? fmt::format("{:+.2f}", 100 * (r.accuracy - base)) : "-", r.t.ratio(),
               static_cast<double>(r.t.bytes_sent) /
                   static_cast<double>(std::max<std::int64_t>(1, r.steps)),
               r.step_ms, r.reduce_ms);
    std::fflush(stdout);
  }
  return 0;
}
}  // namespace

int main(int argc, char** argv) try {
  std::size_t n = std::size_t{1} << 22;  // 16 MiB of fp32: a typical DDP bucket
  int ranks = 4, reps = 7, epochs = 3;
  double alpha_us = 20;
  bool train = false, paths = false, layout = false;
  std::size_t limit = 0;
  std::uint64_t seed = 42;
  std::vector<std::string> specs{"none",       "fp16", "bf16",       "int8",      "topk:0.01",
                                 "topk:0.001", "sign", "powersgd:1", "powersgd:4"};
  try {
    ringflow::tool_flags::reader flags(argc, argv);
    while (flags.next()) {
      if (flags.is("--train"))
        flags.no_value(), train = true;
      else if (flags.is("--fp16-paths"))
        flags.no_value(), paths = true;
      else if (flags.is("--powersgd-layout"))
        flags.no_value(), layout = true;
      else if (flags.is("--elements"))
        n = flags.count(1, std::size_t{1} << 27);
      else if (flags.is("--ranks"))
        ranks = static_cast<int>(flags.integer(1, 128));
      else if (flags.is("--alpha-us"))
        alpha_us = static_cast<double>(flags.integer(0, 1000000));
      else if (flags.is("--reps"))
        reps = static_cast<int>(flags.integer(1, 10000));
      else if (flags.is("--only"))
        specs = split(flags.text());
      else if (flags.is("--epochs"))
        epochs = static_cast<int>(flags.integer(1, 1000));
      else if (flags.is("--limit"))
        limit = flags.count(1, 10'000'000);
      else if (flags.is("--seed"))
        seed = static_cast<std::uint64_t>(flags.integer(0, INT64_MAX));
      else if (flags.is("--help", "-h")) {
        std::printf("%s", usage_text);
        return 0;
      } else {
        flags.unknown();
      }
    }
  } catch (const ringflow::tool_flags::bad_flag& e) {
    return ringflow::tool_flags::report("compress_bench", e);
  }
  if (train) {
    if (specs.front() == "none" && specs.size() == 9) {  // the default list: add auto, drop repeats
      specs = {"none", "fp16", "bf16", "int8", "topk:0.01", "sign", "powersgd:4", "auto"};
    }
    return train_table(specs, ranks, epochs, limit, seed);
  }
  if (layout) return powersgd_layout(reps);

  std::vector<float> x(n), out(n);
  const auto key = kernels::stream_key(3, 0, 0);
  for (std::size_t i = 0; i < n; ++i) x[i] = (kernels::uniform01(key, i) * 2 - 1) * 1e-2f;
  if (paths) return fp16_paths(x, reps);

  fmt::print(
      "compress_bench: {} fp32 elements ({:.1f} MiB), bytes sent for {} ranks, median of {} "
      "runs; GB/s of fp32 input per thread CPU second (last column: per wall second); "
      "memcpy of the same 4n bytes timed in every rep beside the codec, x = codec GB/s / "
      "memcpy GB/s (median of per-rep ratios); codec paths: {}; \"wins below\": the link bandwidth "
      "under which the cost model (decide.hpp, break_even_gbps, {} us latency, {} ranks) "
      "predicts this codec beats plain fp32\n\n",
      n, 4.0 * static_cast<double>(n) / (1 << 20), ranks, reps, to_string(best_codec_path()),
      alpha_us, ranks);
  fmt::print(
      "| compressor | payload bytes | ratio | bytes sent / rank | memcpy GB/s | encode GB/s | "
      "encode x memcpy | decode-add GB/s | decode-add x memcpy | encode+decode GB/s | "
      "encode+decode GB/s (wall) | wins below link GB/s "
      "|\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
  std::vector<float> copy(n);
  for (const std::string& spec : specs) {
    auto c = make_compressor(spec, 1);
    std::vector<std::byte> payload(c->payload_bytes(n));
    std::vector<double> te, td, tw, tm, re, rd;
    for (int r = 0; r <= reps; ++r) {
      std::fill(out.begin(), out.end(), 0.0f);
      // memcpy first or last, alternating, so neither side always runs warm.
      auto run_memcpy = [&] {
        const double m0 = thread_seconds();
        std::memcpy(copy.data(), x.data(), 4 * n);
        return thread_seconds() - m0;
      };
      const double m_before = r % 2 == 0 ? run_memcpy() : 0.0;
      const auto w0 = clock_type::now();
      const double t0 = thread_seconds();
      c->encode(x, payload, 0);
      const double t1 = thread_seconds();
      c->decode_add(payload, out);
      const double t2 = thread_seconds();
      const auto w1 = clock_type::now();
      const double m = r % 2 == 0 ? m_before : run_memcpy();
      if (r == 0) continue;  // warm-up
      te.push_back(t1 - t0);
      td.push_back(t2 - t1);
      tm.push_back(m);
      re.push_back(m / (t1 - t0));
      rd.push_back(m / (t2 - t1));
      tw.push_back(std::chrono::duration<double>(w1 - w0).count());
    }
    std::size_t sent = 0;
    for (const auto& w : c->wire_plan(n, ranks)) sent += ring_bytes_sent(w, ranks, 0);
    const double bytes = 4.0 * static_cast<double>(n);
    const double e = median(te), d = median(td), w = median(tw), mc = median(tm);
    // The cost model's crossover with these codec speeds: below this link
    // bandwidth (at --alpha-us latency) compressing this bucket pays.
    const double be = break_even_gbps(*c, n, ranks, alpha_us * 1e-6,
                                      codec_speed{bytes / e / 1e9, bytes / d / 1e9});
    const std::string wins = c->name() == "none" ? "-"
                             : be == 0.0         ? "never"
                             : std::isinf(be)    ? "always"
                                                 : fmt::format("{:.2f} ({:.1f} Gb/s)", be, 8 * be);
    fmt::print(
        "| {} | {} | {:.2f} | {} | {:.2f} | {:.2f} | {:.2f}x | {:.2f} | {:.2f}x | {:.2f} | {:.2f} "
        "| {} |\n",
        c->name(), c->payload_bytes(n), bytes / static_cast<double>(c->payload_bytes(n)), sent,
        bytes / mc / 1e9, bytes / e / 1e9, median(re), bytes / d / 1e9, median(rd),
        bytes / (e + d) / 1e9, bytes / w / 1e9, wins);
    std::fflush(stdout);
  }
  return 0;
} catch (const ringflow::error& e) {
  // A bad --only spec, or a dataset that cannot be loaded.
  fmt::print(stderr, "compress_bench: {}\n", e.what());
  return 2;
}
