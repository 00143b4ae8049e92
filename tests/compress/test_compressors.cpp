// Compressors on one rank: round-trip error bounds, exact payload sizes,
// the shared functors, determinism, bad parameters and NaN handling.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <vector>

#include "ringflow/compress/compressor.hpp"
#include "ringflow/compress/decide.hpp"
#include "ringflow/compress/kernels.hpp"
#include "ringflow/core/error.hpp"
#include "support/catch.hpp"

using namespace ringflow;
using namespace ringflow::compress;

namespace {
std::vector<float> random_vector(std::size_t n, std::uint64_t seed, float scale = 1.0f) {
  std::vector<float> v(n);
  const std::uint64_t key = kernels::stream_key(seed, 1, 2);
  for (std::size_t i = 0; i < n; ++i) v[i] = (kernels::uniform01(key, i) * 2.0f - 1.0f) * scale;
  return v;
}

std::vector<float> round_trip(compressor& c, const std::vector<float>& x,
                              std::uint64_t bucket = 0) {
  std::vector<std::byte> payload(c.payload_bytes(x.size()));
  c.encode(x, payload, bucket);
  std::vector<float> out(x.size(), 123.0f);
  c.decode(payload, out);
  return out;
}

// Relative closeness (Catch2 v2 and v3 spell Approx differently).
bool near(double a, double b, double rel) {
  return std::abs(a - b) <= rel * std::max(std::abs(a), std::abs(b));
}

// Runs f and requires a usage_error whose message contains `word`.
template <class F>
void require_usage_error(F f, const std::string& word) {
  try {
    f();
  } catch (const usage_error& e) {
    INFO(e.what());
    REQUIRE(std::string(e.what()).find(word) != std::string::npos);
    return;
  }
  FAIL("expected usage_error mentioning '" << word << "'");
}
}  // namespace

TEST_CASE("counter-based random numbers are a pure function of (seed, step, rank, index)",
          "[compress][kernels]") {
  const auto k1 = kernels::stream_key(7, 3, 1), k2 = kernels::stream_key(7, 3, 1);
  REQUIRE(k1 == k2);
  REQUIRE(kernels::stream_key(7, 3, 2) != k1);
  REQUIRE(kernels::stream_key(8, 3, 1) != k1);
  double mean = 0;
  for (std::uint64_t i = 0; i < 100000; ++i) {
    const float u = kernels::uniform01(k1, i);
    REQUIRE(u >= 0.0f);
    REQUIRE(u < 1.0f);
    mean += u;
  }
  REQUIRE(std::abs(mean / 100000 - 0.5) < 0.01);
}

TEST_CASE("quantize_int8 is unbiased, within one step, and clamps to the levels",
          "[compress][kernels]") {
  const kernels::quantize_int8 q{10.0f, 7, kernels::stream_key(1, 0, 0)};  // step 0.1
  double sum = 0;
  const int trials = 20000;
  for (int i = 0; i < trials; ++i) {
    const std::int8_t v = q(0.234f, static_cast<std::uint64_t>(i));
    REQUIRE((v == 2 || v == 3));
    sum += v * 0.1;
  }
  REQUIRE(std::abs(sum / trials - 0.234) < 0.003);
  REQUIRE(q(5.0f, 0) == 7);
  REQUIRE(q(-5.0f, 0) == -7);
  REQUIRE(q(std::nanf(""), 0) == 0);
  REQUIRE(q(-0.05f, 0) <= 0);
  REQUIRE(q(-0.05f, 0) >= -1);
}

TEST_CASE("sign packing puts element i in bit i", "[compress][kernels]") {
  float x[5] = {1.0f, -2.0f, 0.0f, -0.5f, 3.0f};
  REQUIRE(kernels::pack_signs(x, 5) == 0b01010u);
  REQUIRE(kernels::unpack_sign(0b01010u, 1, 2.0f) == -2.0f);
  REQUIRE(kernels::unpack_sign(0b01010u, 2, 2.0f) == 2.0f);
  REQUIRE(kernels::magnitude_key(std::nanf("")) > kernels::magnitude_key(INFINITY));
  REQUIRE(kernels::magnitude_key(-3.0f) > kernels::magnitude_key(2.0f));
}

TEST_CASE("payload sizes and compression ratios are exact", "[compress][bytes]") {
  const std::size_t n = std::size_t{1} << 20;
  REQUIRE(make_compressor("none")->payload_bytes(n) == 4 * n);
  REQUIRE(make_compressor("fp16")->payload_bytes(n) == 2 * n);
  REQUIRE(make_compressor("bf16")->payload_bytes(n) == 2 * n);
  REQUIRE(make_compressor("int8")->payload_bytes(n) == n + 4 * (n / 256));  // 1,064,960
  REQUIRE(make_compressor("int8")->payload_bytes(1000) == 1000 + 4 * 4);
  REQUIRE(make_compressor("int8:64")->payload_bytes(1000) == 1000 + 4 * 16);
  REQUIRE(make_compressor("topk:0.01")->payload_bytes(1000) == 8 * 10);
  REQUIRE(make_compressor("topk:0.01")->payload_bytes(1001) == 8 * 11);
  REQUIRE(make_compressor("topk:0.01")->payload_bytes(5) == 8);  // at least one element
  REQUIRE(make_compressor("topk:1")->payload_bytes(7) == 56);
  REQUIRE(make_compressor("sign")->payload_bytes(n) == 4 * (n / 256) + n / 8);  // 147,456: 28.44x
  REQUIRE(make_compressor("sign")->payload_bytes(33) == 4 + 8);
  auto p = make_compressor("powersgd:4");
  REQUIRE(p->payload_bytes(n) == 4 * 4 * (1024 + 1024));  // 32,768: 128x
  auto* ps = dynamic_cast<powersgd_compressor*>(p.get());
  REQUIRE(ps);
  const auto s = ps->shape_of(1000);
  REQUIRE(s.rows == 32);
  REQUIRE(s.cols == 32);
  REQUIRE(ps->shape_of(3).rank == 2);  // 2 x 2 matrix: rank clamped to 2
  REQUIRE(ps->shape_of(1001).rows == 32);
  REQUIRE(ps->shape_of(1001).cols == 32);
  REQUIRE(ps->shape_of(1025).rows * ps->shape_of(1025).cols >= 1025);
}

TEST_CASE("ring byte counts are exact and sum to the ring's total", "[compress][bytes]") {
  for (int p = 1; p <= 5; ++p) {
    for (std::size_t count : {1, 7, 1000}) {
      std::size_t total = 0;
      for (int r = 0; r < p; ++r)
        total += ring_bytes_sent(wire_round{combine::sum, 4 * count, 4}, p, r);
      REQUIRE(total == 2 * static_cast<std::size_t>(p - 1) * 4 * count);
      REQUIRE(ring_bytes_sent(wire_round{combine::gather, 80, 1}, p, 0) ==
              static_cast<std::size_t>(p - 1) * 80);
    }
  }
}

TEST_CASE("round trips stay within each compressor's error bound", "[compress][roundtrip]") {
  const std::size_t n = 5000;
  const auto x = random_vector(n, 11, 3.0f);

  SECTION("none is exact") {
    auto c = make_compressor("none");
    REQUIRE(round_trip(*c, x) == x);
  }
  SECTION("fp16: relative 2^-11 in the normal range") {
    auto c = make_compressor("fp16");
    const auto y = round_trip(*c, x);
    for (std::size_t i = 0; i < n; ++i) {
      REQUIRE(std::abs(y[i] - x[i]) <= std::ldexp(std::abs(x[i]), -11) + std::ldexp(1.0f, -25));
    }
  }
  SECTION("bf16: relative 2^-8") {
    auto c = make_compressor("bf16");
    const auto y = round_trip(*c, x);
    for (std::size_t i = 0; i < n; ++i)
      REQUIRE(std::abs(y[i] - x[i]) <= std::ldexp(std::abs(x[i]), -8));
  }
  SECTION("int8: below one step (block max / 127) and unbiased") {
    for (std::size_t block : {256, 64, 7}) {
      int8_compressor c(block, 5);
      const auto y = round_trip(c, x);
      double bias = 0;
      for (std::size_t b = 0; b * block < n; ++b) {
        const std::size_t lo = b * block, hi = std::min(n, lo + block);
        float m = 0;
        for (std::size_t i = lo; i < hi; ++i) m = std::max(m, std::abs(x[i]));
        for (std::size_t i = lo; i < hi; ++i) {
          REQUIRE(std::abs(y[i] - x[i]) < m / 127.0f * 1.0001f);
          bias += y[i] - x[i];
        }
      }
      REQUIRE(std::abs(bias / n) < 3.0 / 127 * 0.05);
    }
  }
  SECTION("top-k keeps exactly the k largest magnitudes") {
    for (std::size_t limit :
         {std::size_t{1} << 16, std::size_t{100}}) {  // exact, then sampled path
      topk_compressor c(0.02, 3, limit);
      const auto y = round_trip(c, x);
      std::vector<float> mags(n);
      for (std::size_t i = 0; i < n; ++i) mags[i] = std::abs(x[i]);
      std::sort(mags.begin(), mags.end(), std::greater<>());
      const std::size_t k = c.k(n);
      REQUIRE(k == 100);
      std::size_t kept = 0;
      for (std::size_t i = 0; i < n; ++i) {
        if (y[i] != 0.0f) {
          ++kept;
          REQUIRE(y[i] == x[i]);
          REQUIRE(std::abs(x[i]) >= mags[k - 1]);
        } else {
          REQUIRE(std::abs(x[i]) <= mags[k - 1]);
        }
      }
      REQUIRE(kept == k);
    }
  }
  SECTION("sign: +-mean|x| per block with the input's signs") {
    auto c = make_compressor("sign:64");
    const auto y = round_trip(*c, x);
    for (std::size_t lo = 0; lo < n; lo += 64) {
      const std::size_t hi = std::min(n, lo + 64);
      float s = 0;
      for (std::size_t i = lo; i < hi; ++i) s += std::abs(x[i]);
      s /= static_cast<float>(hi - lo);
      for (std::size_t i = lo; i < hi; ++i) {
        REQUIRE(near(std::abs(y[i]), s, 1e-6));
        REQUIRE((y[i] < 0) == (x[i] < 0));
      }
    }
  }
  SECTION("PowerSGD: exact on a rank-r matrix, never longer than the input") {
    // 40 x 40 matrix of rank 2.
    std::vector<float> m(1600);
    const auto u = random_vector(80, 1), v = random_vector(80, 2);
    for (std::size_t i = 0; i < 40; ++i)
      for (std::size_t j = 0; j < 40; ++j) m[i * 40 + j] = u[i] * v[j] + u[40 + i] * v[40 + j];
    powersgd_compressor c(2, 9);
    // Two steps: the warm start makes the second one converge further.
    round_trip(c, m, 4);
    const auto y = round_trip(c, m, 4);
    double err = 0, norm = 0;
    for (std::size_t i = 0; i < m.size(); ++i) {
      err += (y[i] - m[i]) * (y[i] - m[i]);
      norm += m[i] * m[i];
    }
    REQUIRE(std::sqrt(err / norm) < 1e-4);
    // A full-rank input: the approximation is a projection, so it is no longer.
    const auto z = round_trip(c, x, 5);
    double nz = 0, nx = 0;
    for (std::size_t i = 0; i < n; ++i) {
      nz += z[i] * z[i];
      nx += x[i] * x[i];
    }
    REQUIRE(nz <= nx * 1.0001);
  }
}

TEST_CASE("encoding is deterministic for a seed", "[compress][determinism]") {
  const auto x = random_vector(100000, 21);
  for (const char* spec : {"int8", "topk:0.001", "sign", "powersgd:2", "fp16"}) {
    INFO(spec);
    auto a = make_compressor(spec, 77), b = make_compressor(spec, 77);
    std::vector<std::byte> pa(a->payload_bytes(x.size())), pb(pa.size());
    for (int step = 0; step < 2; ++step) {
      a->encode(x, pa, 1);
      b->encode(x, pb, 1);
      REQUIRE(pa == pb);
    }
  }
  // A different seed changes int8's stochastic rounding.
  auto a = make_compressor("int8", 1), b = make_compressor("int8", 2);
  std::vector<std::byte> pa(a->payload_bytes(x.size())), pb(pa.size());
  a->encode(x, pa);
  b->encode(x, pb);
  REQUIRE(pa != pb);
}

TEST_CASE("bad parameters are rejected with a message naming them", "[compress][errors]") {
  require_usage_error([] { make_compressor("powersgd:0"); }, "rank");
  require_usage_error([] { make_compressor("powersgd"); }, "rank");
  require_usage_error([] { make_compressor("powersgd:-2"); }, "rank");
  require_usage_error([] { make_compressor("topk:0"); }, "ratio");
  require_usage_error([] { make_compressor("topk:1.5"); }, "ratio");
  require_usage_error([] { make_compressor("topk:-0.1"); }, "ratio");
  require_usage_error([] { make_compressor("topk:nan"); }, "ratio");
  require_usage_error([] { make_compressor("topk:abc"); }, "ratio");
  require_usage_error([] { make_compressor("topk"); }, "ratio");
  require_usage_error([] { make_compressor("int8:0"); }, "block");
  require_usage_error([] { make_compressor("sign:33"); }, "block");
  require_usage_error([] { make_compressor("fp16:3"); }, "no parameter");
  require_usage_error([] { make_compressor("zip"); }, "unknown compressor");
  for (const char* spec : {"none", "fp16", "int8", "topk:0.1", "sign", "powersgd:1"}) {
    INFO(spec);
    auto c = make_compressor(spec);
    std::vector<float> empty;
    std::vector<std::byte> payload;
    require_usage_error([&] { c->encode(empty, payload); }, "empty");
    std::vector<float> x(10, 1.0f);
    std::vector<std::byte> wrong(c->payload_bytes(10) + 1);
    require_usage_error([&] { c->encode(x, wrong); }, "bytes");
    require_usage_error([&] { c->decode(wrong, x); }, "bytes");
  }
  require_usage_error([] { link_model::from_gbps(0); }, "gbps");
}

TEST_CASE("non-finite inputs propagate instead of vanishing", "[compress][nan]") {
  std::vector<float> x(512, 0.5f);
  x[10] = std::nanf("");
  for (const char* spec : {"fp16", "bf16", "int8", "topk:0.01", "sign", "powersgd:1"}) {
    INFO(spec);
    auto c = make_compressor(spec);
    const auto y = round_trip(*c, x);
    REQUIRE(std::isnan(y[10]));
  }
  // int8 and sign confine the damage to the block of the NaN.
  for (const char* spec : {"int8", "sign"}) {
    auto c = make_compressor(spec);
    const auto y = round_trip(*c, x);
    REQUIRE(std::isnan(y[255]));
    REQUIRE(std::isfinite(y[256]));
  }
}

TEST_CASE("the alpha-beta model prefers compression on slow links and big buckets",
          "[compress][decide]") {
  const auto slow = link_model::from_gbps(10, 20);
  const auto fast = link_model::from_gbps(800, 2);
  // Plain 16-rank allreduce of 25 MB at 10 Gb/s: 2*15/16*25e6*0.8e-9 s + 30 * 20 us.
  const std::size_t n = 25'000'000 / 4;
  const double want = 2.0 * 15 / 16 * 25e6 * 8 / 10e9 + 30 * 20e-6;
  auto fp16 = make_compressor("fp16");
  const auto pr = predict(*fp16, n, 16, slow, codec_speed{5, 5});
  REQUIRE(near(pr.plain_s, want, 1e-9));
  REQUIRE(near(pr.wire_s, want - 2.0 * 15 / 16 * 12.5e6 * 8 / 10e9, 1e-9));
  REQUIRE(near(pr.codec_s, 2 * 25e6 / 5e9, 1e-9));

  auto_policy pol(slow, 16, {"bf16", "int8", "sign"});
  pol.set_speed("bf16", codec_speed{4, 4});
  pol.set_speed("int8", codec_speed{1, 2});
  pol.set_speed("sign", codec_speed{2, 4});
  REQUIRE(pol.choose(n) != "none");
  // A tiny bucket: latency dominates. The 16-element bucket saves no time in
  // bf16 (same 2(p-1) messages) and int8 pays two rounds: stay plain. (An
  // allgather has half the ring allreduce's messages, so the model does let
  // sign win there: that is the model's honest answer, not a bug.)
  auto_policy small(slow, 16, {"bf16", "int8"});
  small.set_speed("bf16", codec_speed{4, 4});
  small.set_speed("int8", codec_speed{1, 2});
  REQUIRE(small.choose(16) == "none");
  auto_policy quick(fast, 16, {"bf16", "int8"});
  quick.set_speed("bf16", codec_speed{4, 4});
  quick.set_speed("int8", codec_speed{1, 2});
  REQUIRE(quick.choose(n) == "none");  // the codec costs more than the bytes it saves
  const cost_model cm = builtin_cost_model();
  const link_model from_cm = link_model::from_cost_model(cm);
  REQUIRE(from_cm.alpha_s == cm.inter.alpha);
  REQUIRE(from_cm.beta_s_per_byte == cm.inter.beta);
  auto_policy one(slow, 1);
  REQUIRE(one.choose(n) == "none");
  auto_policy uncalibrated(slow, 4);
  require_usage_error([&] { uncalibrated.choose(n); }, "calibrate");
}

TEST_CASE("break_even_gbps is where the model's two predictions cross", "[compress][decide]") {
  // bf16 at 2 ranks, no latency: plain 4n*beta, bf16 2n*beta + 4n/4e9 + 4n/4e9,
  // so it wins below 2n / (2n / 1e9) = 1 GB/s.
  const std::size_t n = 1 << 20;
  auto bf16 = make_compressor("bf16");
  REQUIRE(near(break_even_gbps(*bf16, n, 2, 0.0, codec_speed{4, 4}), 1.0, 1e-12));
  // With a 10% margin: 0.9 * 4n*beta > 2n*beta + 2n/1e9 -> 1.6n*beta > 2n/1e9: 0.8 GB/s.
  REQUIRE(near(break_even_gbps(*bf16, n, 2, 0.0, codec_speed{4, 4}, 0.1), 0.8, 1e-12));
  // top-k at 50% density on 16 ranks sends more than the fp32 ring: never wins.
  REQUIRE(break_even_gbps(*make_compressor("topk:0.5"), n, 16, 20e-6, codec_speed{1, 1}) == 0.0);
  REQUIRE(break_even_gbps(*bf16, n, 1, 20e-6, codec_speed{4, 4}) == 0.0);
  // The policy's verdict flips at its break-even speed, for every candidate.
  for (const int ranks : {2, 4, 16}) {
    for (const std::string spec : {"bf16", "int8"}) {
      auto_policy probe(link_model::from_gbps(8, 20), ranks, {spec});
      probe.set_speed(spec, spec == "bf16" ? codec_speed{6, 9} : codec_speed{3, 12});
      const double gbps = probe.break_even(n).at(spec);
      INFO(spec << " at " << ranks << " ranks: wins below " << gbps << " GB/s");
      REQUIRE(gbps > 0);
      REQUIRE(std::isfinite(gbps));
      for (const auto& [factor, want] :
           {std::pair{0.97, spec}, std::pair{1.03, std::string("none")}}) {
        auto_policy pol(link_model::from_gbps(8 * gbps * factor, 20), ranks, {spec});
        pol.set_speed(spec, spec == "bf16" ? codec_speed{6, 9} : codec_speed{3, 12});
        REQUIRE(pol.choose(n) == want);
      }
    }
  }
}
