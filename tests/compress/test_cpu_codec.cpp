// The CPU codec loops (cpu_codec.hpp) give the bits of the kernels.hpp functors
// on every path this CPU runs (baseline, AVX2, AVX-512), for sizes around
// every vector width, unaligned starts, non-zero random counters, and the
// awkward values: NaN, Inf, -0, subnormals, exact levels and rounding ties.
// The compressors, run with the dispatched path, equal a functor reference.
#include <algorithm>
#include <cstring>
#include <limits>
#include <vector>

#include "ringflow/compress/compressor.hpp"
#include "ringflow/compress/cpu_codec.hpp"
#include "ringflow/compress/kernels.hpp"
#include "ringflow/core/error.hpp"
#include "ringflow/core/half.hpp"
#include "support/catch.hpp"

using namespace ringflow;
using namespace ringflow::compress;

namespace {

float from_bits(std::uint32_t u) { return detail::bits_float(u); }

// Random floats of every magnitude, with the special values sprinkled in.
std::vector<float> awkward(std::size_t n, std::uint64_t seed, float spread = 1.0f) {
  const std::uint64_t key = kernels::stream_key(seed, 7, 1);
  std::vector<float> x(n);
  for (std::size_t i = 0; i < n; ++i) {
    const float u = kernels::uniform01(key, i);
    x[i] = (2 * u - 1) * spread;
  }
  const float specials[] = {0.0f,
                            -0.0f,
                            std::numeric_limits<float>::quiet_NaN(),
                            -std::numeric_limits<float>::infinity(),
                            std::numeric_limits<float>::infinity(),
                            from_bits(0x00000001u),
                            from_bits(0x807fffffu),
                            from_bits(0x7fa00001u) /* signalling NaN */,
                            from_bits(0xffc12345u),
                            65504.0f,
                            1e-40f,
                            -3.0e38f};
  for (std::size_t k = 0; k < std::size(specials); ++k) {
    const std::size_t i = (k * 977 + 13) % n;
    if (n > 64) x[i] = specials[k];
  }
  return x;
}

std::vector<float> finite_only(std::vector<float> x) {
  for (float& v : x) {
    if (!(detail::float_bits(v) << 1 < 0xff000000u)) v = 0.5f;  // NaN and Inf out
  }
  return x;
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), 4 * a.size()) == 0;
}

const std::size_t sizes[] = {1,  7,  8,  15,  16,  17,  31,   32,  33,
                             63, 64, 65, 255, 256, 257, 1000, 4099};

}  // namespace

TEST_CASE("the dispatched codec path is one this CPU runs", "[compress][cpu_codec]") {
  const auto paths = supported_codec_paths();
  REQUIRE(paths.front() == codec_path::baseline);
  CHECK(std::find(paths.begin(), paths.end(), best_codec_path()) != paths.end());
  CHECK(std::string(to_string(codec_path::avx2)) == "avx2");
  if (paths.back() != codec_path::avx512) {
    float x = 1;
    CHECK_THROWS_AS(cpu::block_absmax(&x, 1, codec_path::avx512), not_supported_error);
  }
  INFO("best path here: " << to_string(best_codec_path()));
  SUCCEED();
}

TEST_CASE("int8 block max and quantization equal the functors on every path",
          "[compress][cpu_codec][int8]") {
  for (const codec_path path : supported_codec_paths()) {
    for (const std::size_t n : sizes) {
      for (const int levels : {127, 63, 7, 1}) {
        const auto x = awkward(n + 3, n * 31 + static_cast<std::size_t>(levels));
        // A start at element 3 (unaligned) and a counter far from 0.
        const float* in = x.data() + 3;
        const std::uint64_t first = 0x123456789abull + n;
        const float scale = cpu::block_absmax(in, n, codec_path::baseline);
        std::uint32_t ref_max = 0;
        for (std::size_t i = 0; i < n; ++i)
          ref_max = std::max(ref_max, kernels::magnitude_key(in[i]));
        REQUIRE(detail::float_bits(cpu::block_absmax(in, n, path)) == ref_max);
        REQUIRE(detail::float_bits(scale) == ref_max);
        // Finite scales: the block's own max (NaN/Inf give inv_step 0), and
        // the same data quantized with a smaller scale so values clamp.
        for (const float s : {scale, 1.0f, 0.37f}) {
          const kernels::quantize_int8 quant{kernels::int8_inv_step(s, levels), levels,
                                             kernels::stream_key(9, n, 3)};
          std::vector<std::int8_t> got(n), want(n);
          cpu::quantize_int8(in, got.data(), n, first, quant, path);
          for (std::size_t i = 0; i < n; ++i) want[i] = quant(in[i], first + i);
          INFO(to_string(path) << " n=" << n << " levels=" << levels << " scale=" << s);
          REQUIRE(got == want);
        }
      }
    }
  }
}

TEST_CASE("int8 quantization hits exact levels and rounding ties like the functor",
          "[compress][cpu_codec][int8]") {
  // v = x * inv_step lands exactly on integers, halves, the limits and just
  // beyond: every branch of quantize_int8.
  const int levels = 63;
  const float inv = 1.0f;  // v = x
  std::vector<float> x;
  for (int k = -70; k <= 70; ++k) {
    for (const float d : {0.0f, 0.5f, 0.25f, -0.25f, 1e-7f, -1e-7f})
      x.push_back(static_cast<float>(k) + d);
  }
  for (const codec_path path : supported_codec_paths()) {
    const kernels::quantize_int8 quant{inv, levels, kernels::stream_key(1, 2, 3)};
    std::vector<std::int8_t> got(x.size()), want(x.size());
    cpu::quantize_int8(x.data(), got.data(), x.size(), 5, quant, path);
    for (std::size_t i = 0; i < x.size(); ++i) want[i] = quant(x[i], 5 + i);
    INFO(to_string(path));
    REQUIRE(got == want);
  }
}

TEST_CASE("int8 dequantization (store and add) equals the functor on every path",
          "[compress][cpu_codec][int8]") {
  for (const codec_path path : supported_codec_paths()) {
    for (const std::size_t n : sizes) {
      std::vector<std::int8_t> q(n + 1);
      for (std::size_t i = 0; i < q.size(); ++i)
        q[i] = static_cast<std::int8_t>((i * 37 + n) % 255 - 127);
      const auto base = finite_only(awkward(n, n + 5));
      for (const float step : {0.0123f, 1.0f, 3.0e36f, std::numeric_limits<float>::quiet_NaN()}) {
        for (const bool add : {false, true}) {
          std::vector<float> got = base, want = base;
          cpu::dequantize_int8(q.data() + 1, got.data(), n, step, add, path);
          const kernels::dequantize_int8 deq{step};
          for (std::size_t i = 0; i < n; ++i)
            want[i] = add ? want[i] + deq(q[i + 1]) : deq(q[i + 1]);
          INFO(to_string(path) << " n=" << n << " add=" << add);
          REQUIRE(same_bits(got, want));
        }
      }
    }
  }
}

TEST_CASE("bf16 encode and decode equal the functors on every path",
          "[compress][cpu_codec][bf16]") {
  // Every rounding boundary of the low 16 bits for a few exponents, plus NaNs.
  std::vector<float> edge;
  for (const std::uint32_t hi : {0x3f80u, 0xbf80u, 0x7f7fu, 0xff7fu, 0x0000u, 0x8000u, 0x7f80u,
                                 0xff80u, 0x7fc0u, 0x7f81u, 0xffffu}) {
    for (const std::uint32_t lo : {0x0000u, 0x0001u, 0x7fffu, 0x8000u, 0x8001u, 0xffffu}) {
      edge.push_back(from_bits(hi << 16 | lo));
    }
  }
  for (const codec_path path : supported_codec_paths()) {
    for (const std::size_t n : sizes) {
      auto x = awkward(n, n + 11, 1e3f);
      for (std::size_t i = 0; i < n; ++i) {
        if (i % 5 == 0) x[i] = edge[i % edge.size()];
      }
      std::vector<std::uint16_t> got(n), want(n);
      cpu::encode_bf16(x.data(), got.data(), n, path);
      for (std::size_t i = 0; i < n; ++i) want[i] = kernels::encode_bf16{}(x[i]);
      INFO(to_string(path) << " n=" << n);
      REQUIRE(got == want);
      const auto base = finite_only(awkward(n, n + 12));
      for (const bool add : {false, true}) {
        std::vector<float> out = base, ref = base;
        cpu::decode_bf16(got.data(), out.data(), n, add, path);
        for (std::size_t i = 0; i < n; ++i) {
          ref[i] = add ? ref[i] + kernels::decode_bf16{}(got[i]) : kernels::decode_bf16{}(got[i]);
        }
        REQUIRE(same_bits(out, ref));
      }
    }
  }
}

TEST_CASE("sign scale, packing and decode-add equal the functors on every path",
          "[compress][cpu_codec][sign]") {
  for (const codec_path path : supported_codec_paths()) {
    for (const std::size_t n : sizes) {
      const auto x = awkward(n, n + 21, 1e-3f);
      const auto fx = finite_only(x);
      INFO(to_string(path) << " n=" << n);
      // The canonical lane sum, bit for bit (finite data: a NaN would hide a difference).
      REQUIRE(detail::float_bits(cpu::abs_sum_block(fx.data(), n, path)) ==
              detail::float_bits(kernels::abs_sum_block(fx.data(), n)));
      REQUIRE(kernels::is_nan(cpu::abs_sum_block(x.data(), n, path)) ==
              kernels::is_nan(kernels::abs_sum_block(x.data(), n)));
      const std::size_t nw = (n + 31) / 32;
      std::vector<std::uint32_t> got(nw), want(nw);
      cpu::pack_signs(x.data(), got.data(), n, path);
      for (std::size_t w = 0; w < nw; ++w) {
        want[w] = kernels::pack_signs(x.data() + 32 * w,
                                      static_cast<unsigned>(std::min<std::size_t>(32, n - 32 * w)));
      }
      REQUIRE(got == want);
      for (const float scale : {0.25f, -0.0f, 1e-30f}) {
        std::vector<float> out = fx, ref = fx;
        cpu::unpack_signs_add(got.data(), out.data(), n, scale, path);
        for (std::size_t i = 0; i < n; ++i)
          ref[i] += kernels::unpack_sign(got[i / 32], i % 32, scale);
        REQUIRE(same_bits(out, ref));
      }
      std::vector<float> out = fx, ref = fx;
      cpu::add(x.data(), out.data(), n, path);
      for (std::size_t i = 0; i < n; ++i) ref[i] += x[i];
      REQUIRE(std::memcmp(out.data(), ref.data(), 4 * n) == 0);  // NaN payloads included
    }
  }
}

TEST_CASE("compressors on the dispatched path equal the functor reference",
          "[compress][cpu_codec]") {
  const std::size_t n = 3000 + 17;  // several blocks and a ragged tail
  const auto x = finite_only(awkward(n, 99, 0.1f));
  SECTION("int8") {
    int8_compressor c(256, 5);
    std::vector<std::byte> p(c.payload_bytes(n));
    c.encode(x, p, 0);
    const std::size_t nb = (n + 255) / 256;
    const std::uint64_t key = kernels::stream_key(5, 0, 0);  // first call: step 0, rank 0
    std::vector<std::byte> want(p.size());
    auto* scales = reinterpret_cast<float*>(want.data());
    auto* q = reinterpret_cast<std::int8_t*>(want.data() + 4 * nb);
    for (std::size_t b = 0; b < nb; ++b) {
      std::uint32_t m = 0;
      for (std::size_t i = 256 * b; i < std::min(n, 256 * b + 256); ++i)
        m = std::max(m, kernels::magnitude_key(x[i]));
      scales[b] = from_bits(m);
      const kernels::quantize_int8 quant{kernels::int8_inv_step(scales[b], 127), 127, key};
      for (std::size_t i = 256 * b; i < std::min(n, 256 * b + 256); ++i) q[i] = quant(x[i], i);
    }
    REQUIRE(p == want);
    std::vector<float> out(n, 1.0f), ref(n, 1.0f);
    c.decode_add(p, out);
    for (std::size_t i = 0; i < n; ++i)
      ref[i] += kernels::dequantize_int8{kernels::int8_step(scales[i / 256], 127)}(q[i]);
    REQUIRE(same_bits(out, ref));
  }
  SECTION("sign") {
    sign_compressor c(64);
    std::vector<std::byte> p(c.payload_bytes(n));
    c.encode(x, p, 0);
    const std::size_t nb = (n + 63) / 64;
    const auto* scales = reinterpret_cast<const float*>(p.data());
    const auto* words = reinterpret_cast<const std::uint32_t*>(p.data() + 4 * nb);
    for (std::size_t b = 0; b < nb; ++b) {
      const std::size_t cnt = std::min<std::size_t>(64, n - 64 * b);
      REQUIRE(detail::float_bits(scales[b]) ==
              detail::float_bits(kernels::abs_sum_block(x.data() + 64 * b, cnt) /
                                 static_cast<float>(cnt)));
    }
    for (std::size_t w = 0; w < (n + 31) / 32; ++w) {
      REQUIRE(words[w] ==
              kernels::pack_signs(x.data() + 32 * w,
                                  static_cast<unsigned>(std::min<std::size_t>(32, n - 32 * w))));
    }
    std::vector<float> out(n, 0.5f), ref(n, 0.5f);
    c.decode_add(p, out);
    for (std::size_t i = 0; i < n; ++i)
      ref[i] += kernels::unpack_sign(words[i / 32], i % 32, scales[i / 64]);
    REQUIRE(same_bits(out, ref));
  }
  SECTION("bf16") {
    half_compressor c(half_compressor::format::bf16);
    std::vector<std::byte> p(c.payload_bytes(n));
    c.encode(x, p, 0);
    const auto* w = reinterpret_cast<const std::uint16_t*>(p.data());
    for (std::size_t i = 0; i < n; ++i) REQUIRE(w[i] == kernels::encode_bf16{}(x[i]));
  }
}
