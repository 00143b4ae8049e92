// gemm: OpenBLAS through dlopen when present, Eigen otherwise (see gemm.hpp).
#include "ringflow/ad/gemm.hpp"

#include <dlfcn.h>
#include <fmt/format.h>

#include <Eigen/Core>
#include <atomic>
#include <cstdlib>
#include <mutex>
#include <string_view>
#include <type_traits>

#include "ringflow/core/env.hpp"
#include "ringflow/core/error.hpp"
#include "ringflow/core/log.hpp"

namespace ringflow::ad {
namespace {

// The CBLAS entry points we use, declared by us (no cblas.h needed at build).
enum : int { cblas_row_major = 101, cblas_no_trans = 111, cblas_trans = 112 };
using sgemm_fn = void (*)(int, int, int, int, int, int, float, const float*, int, const float*, int,
                          float, float*, int);
using dgemm_fn = void (*)(int, int, int, int, int, int, double, const double*, int, const double*,
                          int, double, double*, int);
using set_threads_fn = void (*)(int);
using corename_fn = char* (*)();

struct blas {
  sgemm_fn sgemm = nullptr;
  dgemm_fn dgemm = nullptr;
  set_threads_fn set_threads = nullptr;
  std::string core;  // OpenBLAS's kernel family, e.g. SkylakeX
  bool usable() const { return sgemm != nullptr && dgemm != nullptr; }
};

std::atomic<int> thread_count{0};
std::atomic<bool> blas_enabled{true};  // 0: not yet read from the environment

int default_threads() {
  return static_cast<int>(env::integer("RINGFLOW_THREADS", 1, {1, 4096}, env::malformed::warn));
}

blas load() {
  blas b;
  // A switch (off: Eigen; on: look for OpenBLAS, as when unset), `eigen`, or
  // the path of a BLAS library.
  std::string want;
  if (const auto v = env::text("RINGFLOW_BLAS")) {
    const auto on = env::parse_switch(*v);
    if ((on && !*on) || env::iequals(*v, "eigen")) return b;
    if (!on) want = *v;
  }
  // An explicit path, or the names Debian's libopenblas0-pthread/-openmp
  // install (through the alternatives system).
  const char* names[] = {want.empty() ? nullptr : want.c_str(), "libopenblas.so.0",
                         "libopenblas.so"};
  for (const char* name : names) {
    if (name == nullptr || *name == '\0') continue;
    void* h = dlopen(name, RTLD_NOW | RTLD_LOCAL);
    if (h == nullptr) {
      if (name == names[0]) {
        log::warn("RINGFLOW_BLAS={}: cannot load it ({}); using Eigen", want, dlerror());
      }
      continue;
    }
    b.sgemm = reinterpret_cast<sgemm_fn>(dlsym(h, "cblas_sgemm"));
    b.dgemm = reinterpret_cast<dgemm_fn>(dlsym(h, "cblas_dgemm"));
    b.set_threads = reinterpret_cast<set_threads_fn>(dlsym(h, "openblas_set_num_threads"));
    if (auto core = reinterpret_cast<corename_fn>(dlsym(h, "openblas_get_corename"))) {
      if (const char* c = core()) b.core = c;
    }
    if (b.usable()) return b;  // the handle stays open for the process's life
    log::warn("{} has no cblas_sgemm/cblas_dgemm; using Eigen", name);
    b = blas{};
    dlclose(h);
  }
  return b;
}

const blas& lib() {
  static const blas b = [] {
    blas l = load();
    int n = thread_count.load();
    if (n == 0) {
      n = default_threads();
      thread_count.store(n);
    }
    // OpenBLAS starts with one thread per core; ranks share the cores, so
    // it gets what set_threads says (1 by default).
    if (l.set_threads != nullptr) l.set_threads(n);
    return l;
  }();
  return b;
}

// Below this many multiply-adds a BLAS call's fixed cost is not worth it.
constexpr double small_product = 8 * 8 * 8;

template <class S>
void eigen_gemm(bool ta, bool tb, index m, index n, index k, S alpha, const S* a, index lda,
                const S* b, index ldb, S beta, S* c, index ldc) {
  using mat = Eigen::Matrix<S, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using stride = Eigen::OuterStride<>;
  using cmap = Eigen::Map<const mat, 0, stride>;
  Eigen::Map<mat, 0, stride> C(c, m, n, stride(ldc));
  const auto run = [&](const auto& A, const auto& B) {
    if (beta == S(0)) {
      C.noalias() = alpha * (A * B);
    } else {
      if (beta != S(1)) C *= beta;
      C.noalias() += alpha * (A * B);
    }
  };
  const cmap A(a, ta ? k : m, ta ? m : k, stride(lda));
  const cmap B(b, tb ? n : k, tb ? k : n, stride(ldb));
  if (ta && tb)
    run(A.transpose(), B.transpose());
  else if (ta)
    run(A.transpose(), B);
  else if (tb)
    run(A, B.transpose());
  else
    run(A, B);
}

bool fits_int(index v) { return v >= 0 && v <= 0x7fffffff; }

}  // namespace

template <class S>
void gemm(bool trans_a, bool trans_b, index m, index n, index k, S alpha, const S* a, index lda,
          const S* b, index ldb, S beta, S* c, index ldc) {
  if (m <= 0 || n <= 0) return;
  if (k <= 0) {
    Eigen::Map<Eigen::Matrix<S, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>, 0,
               Eigen::OuterStride<>>
        C(c, m, n, Eigen::OuterStride<>(ldc));
    if (beta == S(0))
      C.setZero();
    else
      C *= beta;
    return;
  }
  const blas& l = lib();
  const bool big =
      static_cast<double>(m) * static_cast<double>(n) * static_cast<double>(k) >= small_product;
  if (l.usable() && big && blas_enabled.load(std::memory_order_relaxed) && fits_int(m) &&
      fits_int(n) && fits_int(k) && fits_int(lda) && fits_int(ldb) && fits_int(ldc)) {
    const int ta = trans_a ? cblas_trans : cblas_no_trans;
    const int tb = trans_b ? cblas_trans : cblas_no_trans;
    if constexpr (std::is_same_v<S, float>) {
      l.sgemm(cblas_row_major, ta, tb, static_cast<int>(m), static_cast<int>(n),
              static_cast<int>(k), alpha, a, static_cast<int>(lda), b, static_cast<int>(ldb), beta,
              c, static_cast<int>(ldc));
    } else {
      l.dgemm(cblas_row_major, ta, tb, static_cast<int>(m), static_cast<int>(n),
              static_cast<int>(k), alpha, a, static_cast<int>(lda), b, static_cast<int>(ldb), beta,
              c, static_cast<int>(ldc));
    }
    return;
  }
  eigen_gemm<S>(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

template void gemm<float>(bool, bool, index, index, index, float, const float*, index, const float*,
                          index, float, float*, index);
template void gemm<double>(bool, bool, index, index, index, double, const double*, index,
                           const double*, index, double, double*, index);

bool use_blas(bool on) {
  blas_enabled.store(on);
  return on && lib().usable();
}

std::string gemm_backend() {
  const blas& l = lib();
  if (!l.usable() || !blas_enabled.load()) return "eigen";
  return fmt::format("openblas {} ({} thread{})", l.core.empty() ? "?" : l.core, threads(),
                     threads() == 1 ? "" : "s");
}

void set_threads(int n) {
  if (n < 1) throw usage_error(fmt::format("ad::set_threads({}): need at least 1 thread", n));
  thread_count.store(n);
  const blas& l = lib();
  if (l.set_threads != nullptr) l.set_threads(n);
  Eigen::setNbThreads(n);
}

int threads() {
  int n = thread_count.load();
  if (n == 0) {
    lib();
    n = thread_count.load();
  }
  return n;
}

}  // namespace ringflow::ad
