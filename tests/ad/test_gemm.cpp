// ad::gemm against a plain triple loop: every transpose combination, row
// strides wider than the rows, alpha/beta, sizes on both sides of the BLAS
// threshold, with the BLAS (when this machine has one) and with Eigen.
#include <cmath>
#include <string>
#include <vector>

#include "ringflow/ad/autodiff.hpp"
#include "ringflow/core/error.hpp"
#include "support/catch.hpp"

namespace ad = ringflow::ad;

namespace {

template <class S>
std::vector<S> filled(std::size_t n, unsigned seed) {
  std::vector<S> v(n);
  unsigned x = seed * 2654435761u + 1;
  for (auto& e : v) {
    x = x * 1664525u + 1013904223u;
    e = static_cast<S>(static_cast<int>(x >> 24) - 128) / S(64);
  }
  return v;
}

template <class S>
void check_case(bool ta, bool tb, ad::index m, ad::index n, ad::index k, S alpha, S beta) {
  const ad::index lda = (ta ? m : k) + 3, ldb = (tb ? k : n) + 1, ldc = n + 2;
  const auto a = filled<S>(static_cast<std::size_t>((ta ? k : m) * lda), 1);
  const auto b = filled<S>(static_cast<std::size_t>((tb ? n : k) * ldb), 2);
  auto c = filled<S>(static_cast<std::size_t>(m * ldc), 3);
  std::vector<S> want = c;
  for (ad::index i = 0; i < m; ++i) {
    for (ad::index j = 0; j < n; ++j) {
      double acc = 0;
      for (ad::index p = 0; p < k; ++p) {
        const S av = ta ? a[static_cast<std::size_t>(p * lda + i)]
                        : a[static_cast<std::size_t>(i * lda + p)];
        const S bv = tb ? b[static_cast<std::size_t>(j * ldb + p)]
                        : b[static_cast<std::size_t>(p * ldb + j)];
        acc += static_cast<double>(av) * static_cast<double>(bv);
      }
      auto& w = want[static_cast<std::size_t>(i * ldc + j)];
      w = static_cast<S>(alpha * acc + (beta == S(0) ? 0.0 : beta * static_cast<double>(w)));
    }
  }
  ad::gemm<S>(ta, tb, m, n, k, alpha, a.data(), lda, b.data(), ldb, beta, c.data(), ldc);
  const double tol = std::is_same_v<S, float> ? 1e-4 : 1e-12;
  for (ad::index i = 0; i < m; ++i) {
    for (ad::index j = 0; j < ldc; ++j) {
      const auto at = static_cast<std::size_t>(i * ldc + j);
      INFO("ta=" << ta << " tb=" << tb << " m=" << m << " n=" << n << " k=" << k << " i=" << i
                 << " j=" << j << " backend=" << ad::gemm_backend());
      if (j >= n) {
        REQUIRE(c[at] == want[at]);  // padding between rows is left alone
      } else {
        REQUIRE(std::abs(c[at] - want[at]) <= tol * (1 + std::abs(want[at])) * (k + 1));
      }
    }
  }
}

template <class S>
void check_all() {
  const ad::index sizes[][3] = {{1, 1, 1}, {3, 5, 2}, {17, 9, 33}, {64, 48, 80}, {7, 130, 1}};
  for (bool ta : {false, true}) {
    for (bool tb : {false, true}) {
      for (const auto& sz : sizes) {
        check_case<S>(ta, tb, sz[0], sz[1], sz[2], S(1), S(0));
        check_case<S>(ta, tb, sz[0], sz[1], sz[2], S(0.5), S(1));
        check_case<S>(ta, tb, sz[0], sz[1], sz[2], S(-2), S(0.25));
      }
    }
  }
}

}  // namespace

TEST_CASE("gemm matches a triple loop with the BLAS and with Eigen", "[ad][gemm]") {
  const bool had_blas = ad::use_blas(true);
  INFO("backend: " << ad::gemm_backend());
  check_all<float>();
  check_all<double>();
  ad::use_blas(false);
  REQUIRE(ad::gemm_backend() == "eigen");
  check_all<float>();
  check_all<double>();
  ad::use_blas(true);
  REQUIRE((ad::gemm_backend() != "eigen") == had_blas);
}

TEST_CASE("gemm with k = 0 scales C by beta", "[ad][gemm]") {
  std::vector<float> c = {1, 2, 3, 4};
  ad::gemm<float>(false, false, 2, 2, 0, 1.0f, nullptr, 1, nullptr, 2, 0.5f, c.data(), 2);
  REQUIRE(c == std::vector<float>{0.5f, 1, 1.5f, 2});
  ad::gemm<float>(false, false, 2, 2, 0, 1.0f, nullptr, 1, nullptr, 2, 0.0f, c.data(), 2);
  REQUIRE(c == std::vector<float>{0, 0, 0, 0});
}

TEST_CASE("set_threads refuses 0 and keeps what it was given", "[ad][gemm]") {
  REQUIRE_THROWS_AS(ad::set_threads(0), ringflow::usage_error);
  const int before = ad::threads();
  ad::set_threads(2);
  REQUIRE(ad::threads() == 2);
  ad::set_threads(before);
  REQUIRE(ad::threads() == before);
}
