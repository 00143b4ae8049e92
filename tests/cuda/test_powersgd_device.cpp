// PowerSGD on the device (cuda::compressed_allreduce with "powersgd:<r>")
// against the CPU powersgd_compressor through ringflow::compressed_allreduce,
// at one rank (an NCCL communicator of one rank, as test_compress_kernels.cpp),
// over three consecutive calls so the warm start of Q is compared too.
//
// Tolerance: the device sums its products (M Q, M^T P, P Q^T) and the
// Householder reductions in another order than Eigen, so results and
// residuals agree to float rounding, not bit for bit. Each entry is a sum of
// up to cols * rank float products (error ~ sqrt(terms) * 6e-8 of the
// magnitudes) and the QR of the well-conditioned P of random data adds a few
// ulps more; we allow 1e-4 of the largest |c| of the bucket (c = g + r), a
// margin of 10-100x over those. What is exact and compared bit for bit: the
// elements sent uncompressed (result c, residual c - c) and the EF invariant
// on the device's own outputs (the result and P Q_mine^T are the same sums
// at one rank).
#include "support/catch.hpp"

#if RINGFLOW_HAS_CUDA && RINGFLOW_HAS_NCCL
#include <cuda_runtime_api.h>
#include <nccl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <vector>

#include "ringflow/backends/local.hpp"
#include "ringflow/compress/compressed_allreduce.hpp"
#include "ringflow/compress/compressor.hpp"
#include "ringflow/compress/kernels.hpp"
#include "ringflow/core/error.hpp"
#include "ringflow/cuda/check.hpp"
#include "ringflow/cuda/compressed_allreduce.hpp"
#include "ringflow/cuda/runtime.hpp"

namespace rc = ringflow::cuda;
namespace kn = ringflow::compress::kernels;
using ringflow::compress::bucket_layout;
using ringflow::compress::make_compressor;
using ringflow::compress::powersgd_compressor;

namespace {

// Values in +-(1..13) with exact zeros sprinkled in (as test_compress_kernels).
std::vector<float> input(std::size_t n, std::uint64_t seed) {
  std::vector<float> v(n);
  const std::uint64_t key = kn::stream_key(seed, 0x5eed, 0);
  for (std::size_t i = 0; i < n; ++i) {
    const float u = kn::uniform01(key, i);
    v[i] = (kn::mix64(key ^ i) & 63) == 0 ? 0.0f
                                          : (u * 2.0f - 1.0f) * (1.0f + static_cast<float>(i % 13));
  }
  return v;
}

rc::device_buffer<float> upload(const std::vector<float>& v) {
  rc::device_buffer<float> d(v.size());
  RINGFLOW_CHECK_CUDA(
      cudaMemcpy(d.data(), v.data(), v.size() * sizeof(float), cudaMemcpyHostToDevice));
  RINGFLOW_CHECK_CUDA(cudaDeviceSynchronize());
  return d;
}

std::vector<float> download(const float* p, std::size_t n) {
  std::vector<float> v(n);
  RINGFLOW_CHECK_CUDA(cudaMemcpy(v.data(), p, n * sizeof(float), cudaMemcpyDeviceToHost));
  return v;
}

void zero(float* p, std::size_t n) {
  RINGFLOW_CHECK_CUDA(cudaMemset(p, 0, n * sizeof(float)));
  RINGFLOW_CHECK_CUDA(cudaDeviceSynchronize());
}

/// max |gpu - cpu| <= tol, the first offender named.
void require_close(const std::vector<float>& gpu, const std::vector<float>& cpu, double tol,
                   const char* what) {
  REQUIRE(gpu.size() == cpu.size());
  for (std::size_t i = 0; i < gpu.size(); ++i) {
    const double d = std::fabs(static_cast<double>(gpu[i]) - static_cast<double>(cpu[i]));
    if (!(d <= tol)) {
      FAIL(what << ": element " << i << " of " << gpu.size() << ": gpu " << gpu[i] << ", cpu "
                << cpu[i] << ", |difference| " << d << " > " << tol);
    }
  }
}

/// The raw (uncompressed) elements of the plan: bitwise equal.
void require_raw_exact(const powersgd_compressor::plan& pl, const std::vector<float>& gpu,
                       const std::vector<float>& cpu, const char* what) {
  for (const auto& g : pl.raw) {
    for (std::size_t i = g.offset; i < g.offset + g.size; ++i) {
      if (std::memcmp(&gpu[i], &cpu[i], sizeof(float)) != 0) {
        FAIL(what << " (sent uncompressed): element " << i << ": gpu " << gpu[i] << ", cpu "
                  << cpu[i]);
      }
    }
  }
}

struct ncclc {
  ncclComm_t comm = nullptr;
  ncclc() {
    int dev = 0;
    RINGFLOW_CHECK_CUDA(cudaGetDevice(&dev));
    REQUIRE(ncclCommInitAll(&comm, 1, &dev) == ncclSuccess);
  }
  ~ncclc() {
    if (comm) ncclCommDestroy(comm);
  }
  ncclc(const ncclc&) = delete;
  ncclc& operator=(const ncclc&) = delete;
};

constexpr std::uint64_t bucket = 5;

/// Three calls of the device and the CPU compressed_allreduce with error
/// feedback on fresh inputs, the residual and the warm start carried.
void compare_three_calls(ncclComm_t comm, const std::string& spec, std::size_t n,
                         const bucket_layout* layout, std::uint64_t seed) {
  INFO(spec << ", n = " << n << (layout ? ", with a layout" : ", no layout"));
  rc::stream s;
  rc::device_compressor dc(spec, 21, bucket);
  auto cpu = make_compressor(spec, 21);
  if (layout) {
    dc.set_layout(*layout);
    cpu->set_layout(*layout);
  }
  REQUIRE(dc.payload_bytes(n) == cpu->payload_bytes(n));
  const auto plan = dynamic_cast<const powersgd_compressor&>(*cpu).plan_of(n);
  ringflow::compress::error_feedback fb;
  rc::device_buffer<float> dr(n);
  zero(dr.data(), n);
  std::vector<float> r_prev(n, 0.0f);
  for (int call = 0; call < 3; ++call) {
    INFO("call " << call);
    const auto g = input(n, seed + static_cast<std::uint64_t>(call));
    std::vector<float> c(n);
    float cmax = 0.0f;
    for (std::size_t i = 0; i < n; ++i) {
      c[i] = kn::ef_compensate{}(g[i], r_prev[i]);
      cmax = std::max(cmax, std::fabs(c[i]));
    }
    std::vector<float> want = g;
    ringflow::local::run(1, [&](ringflow::communicator& comm1) {
      ringflow::compressed_allreduce(comm1, std::span(want), *cpu, bucket, &fb);
    });
    const auto r_span = fb.residual(bucket, n);
    const std::vector<float> want_r(r_span.begin(), r_span.end());

    auto dg = upload(g);
    rc::compressed_allreduce(comm, 0, 1, dg.data(), n, dc, dr.data(), s);
    s.synchronize();
    const auto got = download(dg.data(), n);
    const auto got_r = download(dr.data(), n);

    const double tol = 1e-4 * std::max(1.0f, cmax);
    require_close(got, want, tol, "result");
    require_close(got_r, want_r, tol, "residual");
    require_raw_exact(plan, got, want, "result");
    require_raw_exact(plan, got_r, want_r, "residual");
    // EF invariant on the device's own outputs: at one rank what was
    // transmitted is the result, and result + residual = c to the rounding
    // of r = c - t (half an ulp of r), plus half an ulp of t should the
    // compiler round the two equal sums of the decode kernel differently.
    for (std::size_t i = 0; i < n; ++i) {
      const double err = static_cast<double>(got[i]) + static_cast<double>(got_r[i]) - c[i];
      if (std::fabs(err) > std::ldexp(std::fabs(static_cast<double>(got_r[i])), -24) +
                               std::ldexp(std::fabs(static_cast<double>(got[i])), -24)) {
        FAIL("EF invariant, element " << i << ": c " << c[i] << ", transmitted " << got[i]
                                      << ", residual " << got_r[i]);
      }
    }
    r_prev = got_r;
  }
  CHECK(dc.calls() == 3);
}

/// A 300x200 weight, its 200 bias values, a 3x4 matrix too small to be worth
/// compressing, 7 elements outside every tensor, then a 64x1000 weight
/// (listed out of order: the plan sorts by offset).
bucket_layout mixed_layout() {
  bucket_layout l;
  const std::size_t w1 = 0, b1 = 300 * 200, small = b1 + 200, gap = small + 12, w2 = gap + 7;
  l.size = w2 + 64 * 1000;
  l.tensors = {{w2, 64, 1000}, {w1, 300, 200}, {b1, 1, 200}, {small, 3, 4}};
  return l;
}

}  // namespace

TEST_CASE("powersgd on the device follows the CPU compressor over three calls (one rank)",
          "[cuda][compress][nccl][powersgd]") {
  ncclc nc;
  SECTION("no layout: the bucket as one near-square zero-padded matrix") {
    std::uint64_t seed = 3100;
    for (const char* spec : {"powersgd:1", "powersgd:4"}) {
      for (std::size_t n : {std::size_t{1}, std::size_t{1000}, std::size_t{100003}}) {
        compare_three_calls(nc.comm, spec, n, nullptr, seed += 10);
      }
    }
  }
  SECTION("a layout: two weights compressed, a bias, a small matrix and a gap sent as they are") {
    const bucket_layout l = mixed_layout();
    // Rank 12 takes two passes of 8 ranks over M in the products.
    std::uint64_t seed = 3200;
    for (const char* spec : {"powersgd:1", "powersgd:4", "powersgd:12"}) {
      const auto pl = [&] {
        powersgd_compressor c(std::stoi(std::string(spec).substr(9)));
        c.set_layout(l);
        return c.plan_of(l.size);
      }();
      REQUIRE(pl.matrices.size() == 2);
      REQUIRE(pl.raw.size() == 1);  // bias, small matrix and gap are adjacent
      compare_three_calls(nc.comm, spec, l.size, &l, seed += 10);
    }
  }
  SECTION("nothing worth compressing: everything raw, no second allreduce") {
    bucket_layout l{3 * 4 + 50, {{0, 3, 4}, {12, 1, 50}}};
    compare_three_calls(nc.comm, "powersgd:4", l.size, &l, 3300);
  }
}

TEST_CASE("powersgd on the device rejects bad layouts and buckets",
          "[cuda][compress][nccl][powersgd]") {
  ncclc nc;
  rc::stream s;
  rc::device_compressor dc("powersgd:4");
  // Overlapping tensors, and one outside the bucket.
  CHECK_THROWS_AS(dc.set_layout(bucket_layout{100, {{0, 5, 10}, {40, 2, 10}}}),
                  ringflow::usage_error);
  CHECK_THROWS_AS(dc.set_layout(bucket_layout{100, {{0, 10, 11}}}), ringflow::usage_error);
  // A bucket of another size than its layout: refused before anything is queued.
  dc.set_layout(bucket_layout{100, {{0, 10, 10}}});
  rc::device_buffer<float> g(120);
  CHECK_THROWS_AS(rc::compressed_allreduce(nc.comm, 0, 1, g.data(), 120, dc, nullptr, s),
                  ringflow::usage_error);
  CHECK_THROWS_AS(rc::device_compressor("powersgd:0"), ringflow::usage_error);
}

TEST_CASE("powersgd with a layout captures into a CUDA graph (no host synchronization)",
          "[cuda][compress][nccl][powersgd]") {
  ncclc nc;
  rc::stream s;
  const bucket_layout l = mixed_layout();
  rc::device_compressor dc("powersgd:4", 3);
  dc.set_layout(l);
  auto dg = upload(input(l.size, 1500));
  rc::device_buffer<float> dr(l.size);
  zero(dr.data(), l.size);
  // The first call allocates the warm start and the workspace.
  rc::compressed_allreduce(nc.comm, 0, 1, dg.data(), l.size, dc, dr.data(), s);
  s.synchronize();
  REQUIRE(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal) == cudaSuccess);
  std::string failed;
  try {
    rc::compressed_allreduce(nc.comm, 0, 1, dg.data(), l.size, dc, dr.data(), s);
  } catch (const std::exception& e) {
    failed = e.what();  // end the capture before failing
  }
  cudaGraph_t graph = nullptr;
  const cudaError_t rc_end = cudaStreamEndCapture(s, &graph);
  CHECK(failed == "");
  CHECK(rc_end == cudaSuccess);
  REQUIRE(graph != nullptr);
  // Replay it: the captured step runs and leaves finite values.
  cudaGraphExec_t exec = nullptr;
  RINGFLOW_CHECK_CUDA(cudaGraphInstantiate(&exec, graph, 0));
  RINGFLOW_CHECK_CUDA(cudaGraphLaunch(exec, s));
  s.synchronize();
  RINGFLOW_CHECK_CUDA(cudaGraphExecDestroy(exec));
  RINGFLOW_CHECK_CUDA(cudaGraphDestroy(graph));
  const auto out = download(dg.data(), l.size);
  CHECK(std::all_of(out.begin(), out.end(), [](float x) { return std::isfinite(x); }));
}

#endif  // RINGFLOW_HAS_CUDA && RINGFLOW_HAS_NCCL
