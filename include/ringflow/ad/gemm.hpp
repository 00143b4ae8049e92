// Matrix products for the autodiff and its layers: one entry point, a fast
// BLAS found at run time, Eigen when there is none.
//
// The library is compiled for baseline x86-64 so a binary built here runs on
// any x86-64 CPU; Eigen's product then uses SSE2 only (about 18 GFLOP/s on the
// MLP's products where the CPU can do 150+). So `gemm` dlopens OpenBLAS
// (Debian's libopenblas0 is built with DYNAMIC_ARCH: it picks Haswell,
// SkylakeX, Zen... kernels by CPUID when it loads) and falls back to Eigen
// when no OpenBLAS is installed (the GPU machine) or RINGFLOW_BLAS=0.
// docs/design.md ("Fast CPU products, portably") says why this and not -march.
#pragma once

#include <string>

#include "ringflow/ad/shape.hpp"

namespace ringflow::ad {

/// C = alpha * op(A) * op(B) + beta * C for row-major matrices: op(A) is
/// m x k, op(B) is k x n, C is m x n; lda, ldb, ldc are the row strides
/// (elements) of A, B and C as stored. beta == 0 overwrites C (NaN in C is
/// not propagated). Defined for float and double.
template <class S>
void gemm(bool trans_a, bool trans_b, index m, index n, index k, S alpha, const S* a, index lda,
          const S* b, index ldb, S beta, S* c, index ldc);

/// What runs the products: "openblas <core> (<n> threads)" or "eigen".
std::string gemm_backend();

/// Turns the BLAS off (false: Eigen from now on) or back on; returns whether
/// the BLAS is now in use (false when none could be loaded). For comparisons
/// and debugging; RINGFLOW_BLAS=0 does the same from the start.
bool use_blas(bool on);

/// Threads for the products of this process (default 1: ranks usually share
/// the cores; RINGFLOW_THREADS sets the default). With OpenBLAS this sets its
/// thread count; with Eigen it calls Eigen::setNbThreads (which needs an
/// OpenMP build to matter). n < 1 is a usage_error.
void set_threads(int n);
int threads();

}  // namespace ringflow::ad
