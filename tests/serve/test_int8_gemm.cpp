// The int8 products equal a scalar int32 reference exactly, on every path
// this CPU runs, for odd sizes (around the 2/4-deep groups and 8/16-wide
// lanes), edge values (-128, 127, 0, 255) and random data.
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "ringflow/core/error.hpp"
#include "ringflow/serve/int8_gemm.hpp"
#include "support/catch.hpp"

using namespace ringflow;
using namespace ringflow::serve;

namespace {

std::vector<std::int32_t> reference(index m, index n, index k, const std::vector<std::uint8_t>& a,
                                    std::int32_t zp, const std::vector<std::int8_t>& b) {
  std::vector<std::int32_t> c(static_cast<std::size_t>(m * n));
  for (index i = 0; i < m; ++i)
    for (index j = 0; j < n; ++j) {
      std::int64_t s = 0;
      for (index l = 0; l < k; ++l) {
        s += (static_cast<std::int64_t>(a[static_cast<std::size_t>(i * k + l)]) - zp) *
             b[static_cast<std::size_t>(l * n + j)];
      }
      c[static_cast<std::size_t>(i * n + j)] = static_cast<std::int32_t>(s);
    }
  return c;
}

// kind 0: random, 1: extremes only (-128/127 weights, 0/255 activations), 2: all -128 x 255.
void fill(std::vector<std::uint8_t>& a, std::vector<std::int8_t>& b, int kind, std::mt19937& rng) {
  std::uniform_int_distribution<int> u8(0, 255), s8(-128, 127), coin(0, 1);
  for (auto& v : a)
    v = static_cast<std::uint8_t>(kind == 0 ? u8(rng) : kind == 1 ? (coin(rng) ? 255 : 0) : 255);
  for (auto& v : b) {
    v = static_cast<std::int8_t>(kind == 0 ? s8(rng) : kind == 1 ? (coin(rng) ? 127 : -128) : -128);
  }
}

}  // namespace

TEST_CASE("the best int8 path is one this CPU runs", "[serve][int8]") {
  const auto paths = supported_int8_paths();
  REQUIRE(paths.front() == int8_path::baseline);
  bool found = false;
  for (const auto p : paths) found = found || p == best_int8_path();
  CHECK(found);
  CHECK(std::string(to_string(int8_path::avx512_vnni)) == "avx512_vnni");
}

TEST_CASE("int8 products equal the int32 reference on every path", "[serve][int8]") {
  std::mt19937 rng(7);
  const index ms[] = {1, 3, 4, 5, 9};
  const index ns[] = {1, 7, 8, 15, 16, 17, 33, 64, 65, 130};
  const index ks[] = {1, 2, 3, 4, 5, 7, 8, 63, 64, 65, 784};
  for (const int8_path path : supported_int8_paths()) {
    INFO("path " << to_string(path));
    for (const index m : ms)
      for (const index n : ns)
        for (const index k : ks)
          for (int kind = 0; kind < 3; ++kind) {
            if (k == 784 && (n > 17 || m > 4)) continue;  // keep it fast
            std::vector<std::uint8_t> a(static_cast<std::size_t>(m * k));
            std::vector<std::int8_t> b(static_cast<std::size_t>(k * n));
            fill(a, b, kind, rng);
            const std::int32_t zp =
                kind == 0 ? static_cast<std::int32_t>(rng() % 256) : (kind == 1 ? 0 : 255);
            const packed_int8_matrix w(b.data(), k, n, n, path);
            REQUIRE(w.path() == path);
            std::vector<std::int32_t> c(static_cast<std::size_t>(m * n), -7);
            gemm_u8s8s32(m, a.data(), k, zp, w, c.data(), n);
            INFO("m " << m << " n " << n << " k " << k << " kind " << kind << " zp " << zp);
            REQUIRE(c == reference(m, n, k, a, zp, b));
          }
  }
}

TEST_CASE("int8 products honour strides and leave the rest of C alone", "[serve][int8]") {
  std::mt19937 rng(11);
  const index m = 6, n = 19, k = 37, lda = 41, ldb = 23, ldc = 29;
  std::vector<std::uint8_t> a(static_cast<std::size_t>(m * lda));
  std::vector<std::int8_t> b(static_cast<std::size_t>(k * ldb));
  fill(a, b, 0, rng);
  std::vector<std::uint8_t> ad(static_cast<std::size_t>(m * k));
  std::vector<std::int8_t> bd(static_cast<std::size_t>(k * n));
  for (index i = 0; i < m; ++i)
    for (index l = 0; l < k; ++l)
      ad[static_cast<std::size_t>(i * k + l)] = a[static_cast<std::size_t>(i * lda + l)];
  for (index l = 0; l < k; ++l)
    for (index j = 0; j < n; ++j)
      bd[static_cast<std::size_t>(l * n + j)] = b[static_cast<std::size_t>(l * ldb + j)];
  const auto ref = reference(m, n, k, ad, 3, bd);
  for (const int8_path path : supported_int8_paths()) {
    INFO("path " << to_string(path));
    const packed_int8_matrix w(b.data(), k, n, ldb, path);
    std::vector<std::int32_t> c(static_cast<std::size_t>(m * ldc), 12345);
    gemm_u8s8s32(m, a.data(), lda, 3, w, c.data(), ldc);
    for (index i = 0; i < m; ++i)
      for (index j = 0; j < ldc; ++j) {
        const auto got = c[static_cast<std::size_t>(i * ldc + j)];
        if (j < n) {
          REQUIRE(got == ref[static_cast<std::size_t>(i * n + j)]);
        } else {
          REQUIRE(got == 12345);
        }
      }
  }
}

TEST_CASE("signed int8 activations give the signed products", "[serve][int8]") {
  std::mt19937 rng(3);
  std::uniform_int_distribution<int> s8(-128, 127);
  const index m = 5, n = 21, k = 13;
  std::vector<std::int8_t> a(static_cast<std::size_t>(m * k)), b(static_cast<std::size_t>(k * n));
  for (auto& v : a) v = static_cast<std::int8_t>(s8(rng));
  for (auto& v : b) v = static_cast<std::int8_t>(s8(rng));
  a[0] = -128;
  a[1] = 127;
  b[0] = -128;
  b[static_cast<std::size_t>(n)] = 127;
  for (const int8_path path : supported_int8_paths()) {
    const packed_int8_matrix w(b.data(), k, n, n, path);
    std::vector<std::int32_t> c(static_cast<std::size_t>(m * n));
    gemm_s8s8s32(m, a.data(), k, w, c.data(), n);
    for (index i = 0; i < m; ++i)
      for (index j = 0; j < n; ++j) {
        std::int32_t s = 0;
        for (index l = 0; l < k; ++l)
          s += a[static_cast<std::size_t>(i * k + l)] * b[static_cast<std::size_t>(l * n + j)];
        REQUIRE(c[static_cast<std::size_t>(i * n + j)] == s);
      }
  }
}

TEST_CASE("the deepest int8 product stays exact", "[serve][int8]") {
  // k = max_int8_depth, all 255 x -128 with zero point 0: -255 * 128 * 65536, just inside int32.
  const index k = max_int8_depth, n = 17;
  std::vector<std::uint8_t> a(static_cast<std::size_t>(k), 255);
  std::vector<std::int8_t> b(static_cast<std::size_t>(k * n), -128);
  for (const int8_path path : supported_int8_paths()) {
    const packed_int8_matrix w(b.data(), k, n, n, path);
    std::vector<std::int32_t> c(static_cast<std::size_t>(n));
    gemm_u8s8s32(1, a.data(), k, 0, w, c.data(), n);
    for (const auto v : c) REQUIRE(v == -255 * 128 * 65536);
  }
}

TEST_CASE("bad int8 product arguments are refused", "[serve][int8]") {
  std::vector<std::int8_t> b(12, 1);
  CHECK_THROWS_AS(packed_int8_matrix(b.data(), 0, 3, 3), usage_error);
  CHECK_THROWS_AS(packed_int8_matrix(b.data(), 4, 3, 2), usage_error);
  CHECK_THROWS_AS(packed_int8_matrix(b.data(), max_int8_depth + 1, 3, 3), usage_error);
  const packed_int8_matrix w(b.data(), 4, 3, 3, int8_path::baseline);
  std::vector<std::uint8_t> a(8, 1);
  std::vector<std::int32_t> c(6);
  CHECK_THROWS_AS(gemm_u8s8s32(2, a.data(), 3, 0, w, c.data(), 3), usage_error);    // lda < k
  CHECK_THROWS_AS(gemm_u8s8s32(2, a.data(), 4, 256, w, c.data(), 3), usage_error);  // zero point
  CHECK_THROWS_AS(gemm_u8s8s32(1, a.data(), 4, 0, packed_int8_matrix{}, c.data(), 3), usage_error);
}

TEST_CASE("input quantization gives the same bytes on every path", "[serve][int8]") {
  std::mt19937 rng(5);
  std::uniform_real_distribution<float> u(-3.0f, 300.0f);
  for (const std::size_t n :
       {std::size_t{1}, std::size_t{15}, std::size_t{16}, std::size_t{31}, std::size_t{32},
        std::size_t{33}, std::size_t{100}, std::size_t{1000}}) {
    std::vector<float> x(n);
    for (auto& v : x) v = u(rng);
    const float specials[] = {std::numeric_limits<float>::quiet_NaN(),
                              std::numeric_limits<float>::infinity(),
                              -std::numeric_limits<float>::infinity(),
                              -0.0f,
                              0.5f,
                              1.5f,
                              254.5f,
                              255.49f,
                              1e30f};
    for (std::size_t k = 0; k < std::size(specials) && k < n; ++k) x[(k * 7) % n] = specials[k];
    std::vector<std::uint8_t> want(n);
    // The reference, element by element.
    for (std::size_t i = 0; i < n; ++i) {
      float v = x[i] * 1.0f + 0.0f;
      v = v > 0.0f ? v : 0.0f;
      v = v < 255.0f ? v : 255.0f;
      want[i] = static_cast<std::uint8_t>(static_cast<int>(v + 0.5f));
    }
    for (const int8_path path : supported_int8_paths()) {
      INFO("path " << to_string(path) << " n " << n);
      std::vector<std::uint8_t> got(n, 7);
      quantize_u8(x.data(), n, 1.0f, 0.0f, got.data(), path);
      REQUIRE(got == want);
      // A scale and zero point: the same as the baseline path.
      std::vector<std::uint8_t> base(n), vec(n);
      quantize_u8(x.data(), n, 0.37f, 17.0f, base.data(), int8_path::baseline);
      quantize_u8(x.data(), n, 0.37f, 17.0f, vec.data(), path);
      REQUIRE(base == vec);
    }
  }
}
