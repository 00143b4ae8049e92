// The fused compression kernels (ringflow/cuda/compress.hpp) and the device
// compressed allreduce against the CPU reference (compress/compressor.hpp):
// payloads, residuals and decoded values bit for bit, on fresh random inputs
// of sizes that are and are not multiples of the block and of 32, outputs
// poisoned before every run. Several ranks are simulated on the one GPU by
// encoding p inputs and combining the p payloads; the CPU side runs the same
// p ranks as threads of the local backend.
#include "support/catch.hpp"

#if RINGFLOW_HAS_CUDA
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include "ringflow/backends/local.hpp"
#include "ringflow/compress/compressed_allreduce.hpp"
#include "ringflow/compress/compressor.hpp"
#include "ringflow/compress/kernels.hpp"
#include "ringflow/core/error.hpp"
#include "ringflow/cuda/check.hpp"
#include "ringflow/cuda/compress.hpp"
#include "ringflow/cuda/reduce.hpp"
#include "ringflow/cuda/runtime.hpp"
#if RINGFLOW_HAS_NCCL
#include "ringflow/cuda/compressed_allreduce.hpp"
#endif

namespace rc = ringflow::cuda;
namespace kn = ringflow::compress::kernels;
using ringflow::compress::compressor;
using ringflow::compress::make_compressor;

namespace {

// Sizes around the interesting boundaries: below, at and above 32 and the
// default block of 256, odd sizes, and the top-k exact/sampled switch (65536).
const std::vector<std::size_t> sizes = {1,    31,   32,    33,    255,    256,    257,
                                        1000, 4103, 65536, 65537, 100003, 1048581};

enum class fill { spread, ties };

// Fresh input for (case, rank, call): values in +-(1..13) with exact zeros
// sprinkled in; `ties` draws from 9 values so magnitudes tie massively.
std::vector<float> input(std::size_t n, std::uint64_t seed, float scale = 1.0f,
                         fill f = fill::spread) {
  std::vector<float> v(n);
  const std::uint64_t key = kn::stream_key(seed, 0x5eed, 0);
  for (std::size_t i = 0; i < n; ++i) {
    const float u = kn::uniform01(key, i);
    if (f == fill::ties) {
      v[i] = static_cast<float>(static_cast<int>(u * 9.0f) - 4) * scale;
    } else if ((kn::mix64(key ^ i) & 63) == 0) {
      v[i] = 0.0f;
    } else {
      v[i] = (u * 2.0f - 1.0f) * (1.0f + static_cast<float>(i % 13)) * scale;
    }
  }
  return v;
}

// The kernels run on a non-blocking stream, which does not wait for the
// legacy default stream; and cudaMemset, or cudaMemcpy from pageable memory,
// may return before the device is done. So every setup step waits for the
// device before the next launch.
void settle() { RINGFLOW_CHECK_CUDA(cudaDeviceSynchronize()); }

template <class T>
rc::device_buffer<T> upload(const std::vector<T>& v) {
  rc::device_buffer<T> d(v.size() ? v.size() : 1);
  if (!v.empty()) {
    RINGFLOW_CHECK_CUDA(
        cudaMemcpy(d.data(), v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice));
  }
  settle();
  return d;
}

void fill_bytes(void* p, int value, std::size_t bytes) {
  RINGFLOW_CHECK_CUDA(cudaMemset(p, value, bytes));
  settle();
}

template <class T>
std::vector<T> download(const T* p, std::size_t n) {
  std::vector<T> v(n);
  if (n) RINGFLOW_CHECK_CUDA(cudaMemcpy(v.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost));
  return v;
}

/// Outputs start as garbage, so a kernel that skips an element is caught.
void poison(void* p, std::size_t bytes) { fill_bytes(p, 0xA5, bytes); }

/// The first index where a and b differ in their bits, or SIZE_MAX.
template <class T>
std::size_t first_difference(const T* a, const T* b, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) {
    if (std::memcmp(a + i, b + i, sizeof(T)) != 0) return i;
  }
  return std::numeric_limits<std::size_t>::max();
}

template <class T>
void require_same_bits(const std::vector<T>& gpu, const std::vector<T>& cpu, const char* what) {
  REQUIRE(gpu.size() == cpu.size());
  const std::size_t i = first_difference(gpu.data(), cpu.data(), gpu.size());
  if (i != std::numeric_limits<std::size_t>::max()) {
    if constexpr (std::is_same_v<T, std::byte>) {
      FAIL(what << ": byte " << i << " of " << gpu.size() << " differs: gpu "
                << static_cast<int>(gpu[i]) << ", cpu " << static_cast<int>(cpu[i]));
    } else {
      FAIL(what << ": element " << i << " of " << gpu.size() << " differs: gpu " << +gpu[i]
                << ", cpu " << +cpu[i]);
    }
  }
}

/// The CPU reference of one error-feedback step: c = g + r, payload =
/// encode(c), residual = c - decode(payload) (compressed_allreduce's r = c - mine).
struct ef_step {
  std::vector<float> c;
  std::vector<std::byte> payload;
  std::vector<float> residual;
};

ef_step cpu_ef(compressor& comp, const std::vector<float>& g, const std::vector<float>* r) {
  const std::size_t n = g.size();
  ef_step out;
  out.c.resize(n);
  for (std::size_t i = 0; i < n; ++i) out.c[i] = r ? kn::ef_compensate{}(g[i], (*r)[i]) : g[i];
  out.payload.resize(comp.payload_bytes(n));
  comp.encode(out.c, out.payload);
  std::vector<float> mine(n);
  comp.decode(out.payload, mine);
  out.residual.resize(n);
  for (std::size_t i = 0; i < n; ++i) out.residual[i] = kn::ef_residual{}(out.c[i], mine[i]);
  return out;
}

std::vector<std::byte> download_bytes(const void* p, std::size_t bytes) {
  std::vector<std::byte> v(bytes);
  RINGFLOW_CHECK_CUDA(cudaMemcpy(v.data(), p, bytes, cudaMemcpyDeviceToHost));
  return v;
}

/// The EF invariant on the device's own outputs: transmitted + residual equals
/// c up to the one rounding of r = c - t (half an ulp of r).
void require_ef_invariant(const std::vector<float>& c, const std::vector<float>& t,
                          const std::vector<float>& r) {
  for (std::size_t i = 0; i < c.size(); ++i) {
    if (!std::isfinite(c[i])) continue;
    const double err = static_cast<double>(t[i]) + static_cast<double>(r[i]) - c[i];
    const double tol = std::ldexp(std::fabs(static_cast<double>(r[i])), -24);
    if (std::fabs(err) > tol) {
      FAIL("EF invariant, element " << i << ": c " << c[i] << ", transmitted " << t[i]
                                    << ", residual " << r[i]);
    }
  }
}

/// CPU compressed_allreduce with error feedback on p thread ranks: rank r
/// starts from residual r_init[r] and reduces g[r]. Returns every rank's
/// result and residual.
struct cpu_allreduce_result {
  std::vector<std::vector<float>> out, residual;
};
cpu_allreduce_result cpu_allreduce(const std::string& spec, std::uint64_t seed,
                                   const std::vector<std::vector<float>>& g,
                                   const std::vector<std::vector<float>>& r_init) {
  const int p = static_cast<int>(g.size());
  cpu_allreduce_result res;
  res.out.resize(g.size());
  res.residual.resize(g.size());
  ringflow::local::run(p, [&](ringflow::communicator& comm) {
    const auto me = static_cast<std::size_t>(comm.rank());
    auto comp = make_compressor(spec, seed);
    ringflow::compress::error_feedback fb;
    auto r = fb.residual(9, g[me].size());
    std::copy(r_init[me].begin(), r_init[me].end(), r.begin());
    std::vector<float> x = g[me];
    ringflow::compressed_allreduce(comm, std::span(x), *comp, 9, &fb);
    res.out[me] = x;
    auto rr = fb.residual(9, x.size());
    res.residual[me].assign(rr.begin(), rr.end());
  });
  return res;
}

}  // namespace

// ---------------------------------------------------------------------------

TEST_CASE("sign: one-pass encode with error feedback equals the CPU bit for bit",
          "[cuda][compress][sign]") {
  rc::stream s;
  std::uint64_t seed = 100;
  for (std::size_t block : {256u, 32u, 1024u, 2048u}) {
    for (std::size_t n : sizes) {
      for (bool ef : {true, false}) {
        INFO("sign:" << block << ", n = " << n << (ef ? ", with residual" : ", no residual"));
        const auto g = input(n, ++seed);
        const auto r = input(n, ++seed, 0.25f);
        ringflow::compress::sign_compressor comp(block);
        const ef_step want = cpu_ef(comp, g, ef ? &r : nullptr);

        auto dg = upload(g);
        auto dr = upload(r);
        const std::size_t pb = rc::sign_payload_bytes(n, block);
        REQUIRE(pb == comp.payload_bytes(n));
        rc::device_buffer<std::byte> payload(pb);
        poison(payload.data(), pb);
        auto* scales = reinterpret_cast<float*>(payload.data());
        auto* words =
            reinterpret_cast<std::uint32_t*>(payload.data() + 4 * rc::block_count(n, block));
        rc::sign_ef_encode(dg.data(), ef ? dr.data() : nullptr, n, block, scales, words, s);
        s.synchronize();
        require_same_bits(download_bytes(payload.data(), pb), want.payload, "payload");
        if (ef) {
          const auto got_r = download(dr.data(), n);
          require_same_bits(got_r, want.residual, "residual");
          // The device's own transmitted values satisfy the EF invariant.
          rc::device_buffer<float> t(n);
          RINGFLOW_CHECK_CUDA(cudaMemsetAsync(t.data(), 0, 4 * n, s));
          rc::sign_decode_add(scales, words, n, block, t.data(), s);
          s.synchronize();
          require_ef_invariant(want.c, download(t.data(), n), got_r);
        } else {
          require_same_bits(download(dr.data(), n), r, "untouched residual");
        }
      }
    }
  }
}

TEST_CASE("sign: decode-accumulate equals the CPU bit for bit", "[cuda][compress][sign]") {
  rc::stream s;
  std::uint64_t seed = 200;
  for (std::size_t block : {256u, 64u}) {
    for (std::size_t n : sizes) {
      INFO("sign:" << block << ", n = " << n);
      ringflow::compress::sign_compressor comp(block);
      const auto x = input(n, ++seed);
      std::vector<std::byte> payload(comp.payload_bytes(n));
      comp.encode(x, payload);
      auto out = input(n, ++seed, 3.0f);
      auto dpay = upload(payload);
      auto dout = upload(out);
      const auto* p = reinterpret_cast<const unsigned char*>(dpay.data());
      rc::sign_decode_add(reinterpret_cast<const float*>(p),
                          reinterpret_cast<const std::uint32_t*>(p + 4 * rc::block_count(n, block)),
                          n, block, dout.data(), s);
      s.synchronize();
      comp.decode_add(payload, out);
      require_same_bits(download(dout.data(), n), out, "decoded");
    }
  }
}

TEST_CASE("sign: p ranks on one GPU equal the CPU compressed allreduce", "[cuda][compress][sign]") {
  rc::stream s;
  std::uint64_t seed = 300;
  for (int p = 1; p <= 4; ++p) {
    for (std::size_t n : {std::size_t{1}, std::size_t{257}, std::size_t{100003}}) {
      for (std::size_t block : {256u, 32u}) {
        const std::string spec = "sign:" + std::to_string(block);
        INFO(spec << ", n = " << n << ", " << p << " ranks");
        std::vector<std::vector<float>> g, r;
        for (int k = 0; k < p; ++k) {
          g.push_back(input(n, ++seed));
          r.push_back(input(n, ++seed, 0.5f));
        }
        const auto want = cpu_allreduce(spec, 1, g, r);
        const std::size_t pb = rc::sign_payload_bytes(n, block);
        const std::size_t nb = rc::block_count(n, block);
        rc::device_buffer<std::byte> all(pb * static_cast<std::size_t>(p));
        poison(all.data(), all.bytes());
        std::vector<rc::device_buffer<float>> dr;
        for (int k = 0; k < p; ++k) {
          auto dg = upload(g[static_cast<std::size_t>(k)]);
          dr.push_back(upload(r[static_cast<std::size_t>(k)]));
          std::byte* mine = all.data() + pb * static_cast<std::size_t>(k);
          rc::sign_ef_encode(dg.data(), dr.back().data(), n, block, reinterpret_cast<float*>(mine),
                             reinterpret_cast<std::uint32_t*>(mine + 4 * nb), s);
          s.synchronize();
        }
        rc::device_buffer<float> out(n);
        poison(out.data(), out.bytes());
        rc::sign_decode_sum(all.data(), pb, p, n, block, out.data(), p, s);
        s.synchronize();
        require_same_bits(download(out.data(), n), want.out[0], "result");
        for (int k = 0; k < p; ++k) {
          require_same_bits(download(dr[static_cast<std::size_t>(k)].data(), n),
                            want.residual[static_cast<std::size_t>(k)], "residual");
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------

TEST_CASE("int8: one-pass local-scale encode equals the CPU bit for bit",
          "[cuda][compress][int8]") {
  rc::stream s;
  std::uint64_t seed = 400;
  for (std::size_t block : {256u, 100u, 1u, 33u, 1024u, 4096u}) {
    for (std::size_t n : sizes) {
      if (block == 1 && n > 100003) continue;  // one warp per element: slow, nothing new
      for (bool ef : {true, false}) {
        INFO("int8:" << block << ", n = " << n << (ef ? ", with residual" : ", no residual"));
        const auto g = input(n, ++seed);
        const auto r = input(n, ++seed, 0.25f);
        ringflow::compress::int8_compressor comp(block, 77);
        const ef_step want = cpu_ef(comp, g, ef ? &r : nullptr);  // the compressor's step 0
        auto dg = upload(g);
        auto dr = upload(r);
        const std::size_t nb = rc::block_count(n, block);
        const std::size_t pb = rc::int8_payload_bytes(n, block);
        REQUIRE(pb == comp.payload_bytes(n));
        rc::device_buffer<std::byte> payload(pb);
        poison(payload.data(), pb);
        auto* scales = reinterpret_cast<float*>(payload.data());
        auto* q = reinterpret_cast<std::int8_t*>(payload.data() + 4 * nb);
        rc::int8_ef_encode(dg.data(), ef ? dr.data() : nullptr, n, block, kn::stream_key(77, 0, 0),
                           scales, q, s);
        s.synchronize();
        require_same_bits(download_bytes(payload.data(), pb), want.payload, "payload");
        if (ef) {
          const auto got_r = download(dr.data(), n);
          require_same_bits(got_r, want.residual, "residual");
          rc::device_buffer<float> t(n);
          RINGFLOW_CHECK_CUDA(cudaMemsetAsync(t.data(), 0, 4 * n, s));
          rc::int8_decode_add(q, scales, n, block, 127, t.data(), s);
          s.synchronize();
          require_ef_invariant(want.c, download(t.data(), n), got_r);
        }
      }
    }
  }
}

TEST_CASE("int8: decode-accumulate equals the CPU bit for bit", "[cuda][compress][int8]") {
  rc::stream s;
  std::uint64_t seed = 500;
  for (std::size_t block : {256u, 100u}) {
    for (std::size_t n : sizes) {
      INFO("int8:" << block << ", n = " << n);
      ringflow::compress::int8_compressor comp(block, 3);
      const auto x = input(n, ++seed);
      std::vector<std::byte> payload(comp.payload_bytes(n));
      comp.encode(x, payload);
      auto out = input(n, ++seed, 3.0f);
      auto dpay = upload(payload);
      auto dout = upload(out);
      const auto* p = reinterpret_cast<const unsigned char*>(dpay.data());
      rc::int8_decode_add(reinterpret_cast<const std::int8_t*>(p + 4 * rc::block_count(n, block)),
                          reinterpret_cast<const float*>(p), n, block, 127, dout.data(), s);
      s.synchronize();
      comp.decode_add(payload, out);
      require_same_bits(download(dout.data(), n), out, "decoded");
    }
  }
}

TEST_CASE("int8: the shared-scale pair on p ranks equals the CPU compressed allreduce",
          "[cuda][compress][int8]") {
  rc::stream s;
  std::uint64_t seed = 600;
  for (int p = 1; p <= 4; ++p) {
    for (std::size_t n : {std::size_t{1}, std::size_t{257}, std::size_t{100003}}) {
      for (std::size_t block : {256u, 100u}) {
        const std::string spec = "int8:" + std::to_string(block);
        INFO(spec << ", n = " << n << ", " << p << " ranks");
        std::vector<std::vector<float>> g, r;
        for (int k = 0; k < p; ++k) {
          g.push_back(input(n, ++seed));
          r.push_back(input(n, ++seed, 0.5f));
        }
        const std::uint64_t cseed = 4242;
        const auto want = cpu_allreduce(spec, cseed, g, r);
        const std::size_t nb = rc::block_count(n, block);
        const int levels = 127 / p;
        // 1. Block scales per rank; the max over ranks of their bits (what
        //    the NCCL path max-allreduces).
        std::vector<rc::device_buffer<float>> dg, dr;
        std::vector<std::uint32_t> shared(nb, 0);
        rc::device_buffer<float> scales(nb);
        for (int k = 0; k < p; ++k) {
          dg.push_back(upload(g[static_cast<std::size_t>(k)]));
          dr.push_back(upload(r[static_cast<std::size_t>(k)]));
          poison(scales.data(), scales.bytes());
          rc::int8_block_absmax(dg.back().data(), dr.back().data(), n, block, scales.data(), s);
          s.synchronize();
          const auto mine = download(reinterpret_cast<const std::uint32_t*>(scales.data()), nb);
          for (std::size_t b = 0; b < nb; ++b) shared[b] = std::max(shared[b], mine[b]);
        }
        auto dshared = upload(shared);
        const auto* shared_scales = reinterpret_cast<const float*>(dshared.data());
        // 2. Quantize each rank; 3. integer sum; 4. decode and average.
        rc::device_buffer<std::int8_t> sum(n), q(n);
        fill_bytes(sum.data(), 0, n);
        for (int k = 0; k < p; ++k) {
          poison(q.data(), n);
          rc::int8_ef_quantize(dg[static_cast<std::size_t>(k)].data(),
                               dr[static_cast<std::size_t>(k)].data(), n, block, shared_scales,
                               levels, kn::stream_key(cseed, 0, static_cast<std::uint64_t>(k)),
                               q.data(), s);
          rc::reduce(ringflow::dtype::i8, ringflow::op_kind::sum, sum.data(), sum.data(), q.data(),
                     n, s);
          s.synchronize();
        }
        rc::device_buffer<float> out(n);
        poison(out.data(), out.bytes());
        rc::int8_decode(sum.data(), shared_scales, n, block, levels, out.data(), p, s);
        s.synchronize();
        require_same_bits(download(out.data(), n), want.out[0], "result");
        for (int k = 0; k < p; ++k) {
          require_same_bits(download(dr[static_cast<std::size_t>(k)].data(), n),
                            want.residual[static_cast<std::size_t>(k)], "residual");
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------

namespace {
void check_topk(rc::stream& s, std::size_t n, double ratio, fill f, bool ef, std::uint64_t seed,
                std::size_t exact_limit = std::size_t{1} << 16) {
  const auto g = input(n, seed, 1.0f, f);
  const auto r = input(n, seed + 1, 0.25f, f);
  ringflow::compress::topk_compressor comp(ratio, 31, exact_limit);
  const std::size_t k = comp.k(n);
  const ef_step want = cpu_ef(comp, g, ef ? &r : nullptr);  // step 0
  auto dg = upload(g);
  auto dr = upload(r);
  rc::device_buffer<std::byte> payload(rc::topk_payload_bytes(k));
  REQUIRE(payload.size() == comp.payload_bytes(n));
  poison(payload.data(), payload.size());
  const std::size_t wsb = rc::topk_workspace_bytes(n, k);
  rc::device_buffer<std::byte> ws(wsb);
  poison(ws.data(), wsb);  // the kernels must not rely on a clean workspace
  auto* idx = reinterpret_cast<std::uint32_t*>(payload.data());
  auto* val = reinterpret_cast<float*>(payload.data() + 4 * k);
  rc::topk_ef_encode(dg.data(), ef ? dr.data() : nullptr, n, k,
                     kn::stream_key(31, 0, kn::topk_sample_stream), idx, val, ws.data(), wsb, s,
                     exact_limit);
  s.synchronize();
  require_same_bits(download_bytes(payload.data(), payload.size()), want.payload,
                    "payload (indices, then values)");
  if (ef) {
    const auto got_r = download(dr.data(), n);
    require_same_bits(got_r, want.residual, "residual");
    rc::device_buffer<float> t(n);
    RINGFLOW_CHECK_CUDA(cudaMemsetAsync(t.data(), 0, 4 * n, s));
    rc::topk_decode_add(idx, val, k, n, t.data(), s);
    s.synchronize();
    require_ef_invariant(want.c, download(t.data(), n), got_r);
  }
}
}  // namespace

TEST_CASE("top-k: encode with error feedback selects the CPU's set bit for bit",
          "[cuda][compress][topk]") {
  rc::stream s;
  std::uint64_t seed = 700;
  for (std::size_t n : sizes) {
    for (double ratio : {0.01, 0.001, 0.3, 1.0}) {
      for (fill f : {fill::spread, fill::ties}) {
        for (bool ef : {true, false}) {
          INFO("topk:" << ratio << ", n = " << n << (f == fill::ties ? ", ties" : "")
                       << (ef ? ", with residual" : ", no residual"));
          check_topk(s, n, ratio, f, ef, seed += 2);
        }
      }
    }
  }
}

TEST_CASE("top-k: the exact path over all elements agrees on a large tensor",
          "[cuda][compress][topk]") {
  rc::stream s;
  check_topk(s, 1048581, 0.01, fill::spread, true, 800, std::numeric_limits<std::size_t>::max());
}

TEST_CASE("top-k: the sampled path on a 64 Mi-element tensor", "[cuda][compress][topk][large]") {
  rc::stream s;
  const std::size_t n = (std::size_t{64} << 20) + 3;
  SECTION("1%") { check_topk(s, n, 0.01, fill::spread, true, 900); }
  SECTION("0.1%, ties") { check_topk(s, n, 0.001, fill::ties, true, 902); }
}

TEST_CASE("top-k: decode-accumulate equals the CPU bit for bit", "[cuda][compress][topk]") {
  rc::stream s;
  std::uint64_t seed = 1000;
  for (std::size_t n : sizes) {
    INFO("n = " << n);
    ringflow::compress::topk_compressor comp(0.05, 2);
    const auto x = input(n, ++seed);
    std::vector<std::byte> payload(comp.payload_bytes(n));
    comp.encode(x, payload);
    auto out = input(n, ++seed, 3.0f);
    auto dpay = upload(payload);
    auto dout = upload(out);
    const std::size_t k = comp.k(n);
    const auto* p = reinterpret_cast<const unsigned char*>(dpay.data());
    rc::topk_decode_add(reinterpret_cast<const std::uint32_t*>(p),
                        reinterpret_cast<const float*>(p + 4 * k), k, n, dout.data(), s);
    s.synchronize();
    comp.decode_add(payload, out);
    require_same_bits(download(dout.data(), n), out, "decoded");
  }
}

TEST_CASE("top-k: p ranks on one GPU equal the CPU compressed allreduce",
          "[cuda][compress][topk]") {
  rc::stream s;
  std::uint64_t seed = 1100;
  for (int p = 1; p <= 4; ++p) {
    for (std::size_t n : {std::size_t{1}, std::size_t{1000}, std::size_t{100003}}) {
      for (const char* spec : {"topk:0.01", "topk:0.3"}) {
        INFO(spec << ", n = " << n << ", " << p << " ranks");
        std::vector<std::vector<float>> g, r;
        for (int k = 0; k < p; ++k) {
          g.push_back(input(n, ++seed));
          r.push_back(input(n, ++seed, 0.5f));
        }
        const std::uint64_t cseed = 8;
        const auto want = cpu_allreduce(spec, cseed, g, r);
        auto cpu = make_compressor(spec, cseed);
        const std::size_t k = dynamic_cast<ringflow::compress::topk_compressor&>(*cpu).k(n);
        const std::size_t pb = rc::topk_payload_bytes(k);
        rc::device_buffer<std::byte> all(pb * static_cast<std::size_t>(p));
        poison(all.data(), all.bytes());
        const std::size_t wsb = rc::topk_workspace_bytes(n, k);
        rc::device_buffer<std::byte> ws(wsb);
        std::vector<rc::device_buffer<float>> dr;
        for (int q = 0; q < p; ++q) {
          auto dg = upload(g[static_cast<std::size_t>(q)]);
          dr.push_back(upload(r[static_cast<std::size_t>(q)]));
          std::byte* mine = all.data() + pb * static_cast<std::size_t>(q);
          rc::topk_ef_encode(dg.data(), dr.back().data(), n, k,
                             kn::stream_key(cseed, 0, kn::topk_sample_stream),
                             reinterpret_cast<std::uint32_t*>(mine),
                             reinterpret_cast<float*>(mine + 4 * k), ws.data(), wsb, s);
          s.synchronize();
        }
        rc::device_buffer<float> out(n);
        fill_bytes(out.data(), 0, out.bytes());
        for (int q = 0; q < p; ++q) {
          const std::byte* pay = all.data() + pb * static_cast<std::size_t>(q);
          rc::topk_decode_add(reinterpret_cast<const std::uint32_t*>(pay),
                              reinterpret_cast<const float*>(pay + 4 * k), k, n, out.data(), s);
        }
        if (p > 1) {
          rc::finish(ringflow::dtype::f32, ringflow::op_kind::avg, out.data(), n, p, s);
        }
        s.synchronize();
        require_same_bits(download(out.data(), n), want.out[0], "result");
        for (int q = 0; q < p; ++q) {
          require_same_bits(download(dr[static_cast<std::size_t>(q)].data(), n),
                            want.residual[static_cast<std::size_t>(q)], "residual");
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------

TEST_CASE("fp16/bf16: encode with error feedback and decode equal the CPU bit for bit",
          "[cuda][compress][half]") {
  rc::stream s;
  std::uint64_t seed = 1200;
  for (const char* spec : {"fp16", "bf16"}) {
    const auto f = std::string(spec) == "fp16" ? rc::half_format::fp16 : rc::half_format::bf16;
    for (std::size_t n : sizes) {
      for (bool ef : {true, false}) {
        INFO(spec << ", n = " << n << (ef ? ", with residual" : ", no residual"));
        // Values from 1e-7 (fp16 subnormals) to 1e5 (fp16 overflow).
        auto g = input(n, ++seed, 1.0f);
        for (std::size_t i = 0; i < n; i += 7) g[i] *= (i % 2) ? 1e-7f : 1e4f;
        const auto r = input(n, ++seed, 0.001f);
        auto comp = make_compressor(spec);
        const ef_step want = cpu_ef(*comp, g, ef ? &r : nullptr);
        auto dg = upload(g);
        auto dr = upload(r);
        rc::device_buffer<std::uint16_t> h(n);
        poison(h.data(), h.bytes());
        rc::half_ef_encode(f, dg.data(), ef ? dr.data() : nullptr, n, h.data(), s);
        s.synchronize();
        require_same_bits(download_bytes(h.data(), 2 * n), want.payload, "payload");
        if (ef) require_same_bits(download(dr.data(), n), want.residual, "residual");
        // decode-accumulate and decode-with-average
        auto out = input(n, ++seed, 2.0f);
        auto dout = upload(out);
        rc::half_decode_add(f, h.data(), n, dout.data(), s);
        s.synchronize();
        comp->decode_add(want.payload, out);
        require_same_bits(download(dout.data(), n), out, "decode_add");
        // half_decode is the last step of the allreduce: half_compressor::reduce
        // decodes the summed payload by assignment (a -0 stays -0; decode()'s
        // zero fill then decode_add would make it +0), then divides by p.
        poison(dout.data(), dout.bytes());
        rc::half_decode(f, h.data(), n, dout.data(), 3, s);
        s.synchronize();
        std::vector<float> avg(n);
        const auto* bits = reinterpret_cast<const std::uint16_t*>(want.payload.data());
        for (std::size_t i = 0; i < n; ++i) {
          avg[i] = (f == rc::half_format::fp16 ? kn::decode_half{}(bits[i])
                                               : kn::decode_bf16{}(bits[i])) /
                   3.0f;
        }
        require_same_bits(download(dout.data(), n), avg, "decode / 3");
      }
    }
  }
}

TEST_CASE("unaligned pointers take the scalar paths and give the same bits",
          "[cuda][compress][half]") {
  rc::stream s;
  const std::size_t n = 1001;
  const auto g = input(n + 1, 1300);
  const auto r = input(n + 1, 1301, 0.5f);
  auto dg = upload(g);
  auto dr = upload(r);
  rc::device_buffer<std::uint16_t> h(n + 1);
  // One float in: 4-byte aligned, not 16.
  rc::half_ef_encode(rc::half_format::bf16, dg.data() + 1, dr.data() + 1, n, h.data() + 1, s);
  s.synchronize();
  auto comp = make_compressor("bf16");
  const std::vector<float> g1(g.begin() + 1, g.end()), r1(r.begin() + 1, r.end());
  const ef_step want = cpu_ef(*comp, g1, &r1);
  require_same_bits(download_bytes(h.data() + 1, 2 * n), want.payload, "payload");
  const auto got_r = download(dr.data() + 1, n);
  require_same_bits(got_r, want.residual, "residual");
}

// ---------------------------------------------------------------------------

#if RINGFLOW_HAS_NCCL
TEST_CASE("compressed_allreduce through NCCL at one rank equals the CPU reference",
          "[cuda][compress][nccl]") {
  int dev = 0;
  RINGFLOW_CHECK_CUDA(cudaGetDevice(&dev));
  ncclComm_t comm = nullptr;
  REQUIRE(ncclCommInitAll(&comm, 1, &dev) == ncclSuccess);
  rc::stream s;
  std::uint64_t seed = 1400;
  for (const char* spec :
       {"none", "fp16", "bf16", "int8", "int8:100", "sign", "sign:64", "topk:0.01", "topk:0.3"}) {
    for (std::size_t n : {std::size_t{1}, std::size_t{1000}, std::size_t{100003}}) {
      INFO(spec << ", n = " << n);
      rc::device_compressor dc(spec, 21);
      REQUIRE(dc.payload_bytes(n) == make_compressor(spec, 21)->payload_bytes(n));
      // The CPU side: the same compressor object over three calls, one
      // residual carried between them.
      auto cpu = make_compressor(spec, 21);
      ringflow::compress::error_feedback fb;
      rc::device_buffer<float> dr(n);
      fill_bytes(dr.data(), 0, dr.bytes());
      for (int call = 0; call < 3; ++call) {
        INFO("call " << call);
        auto g = input(n, ++seed);
        // Tiny values too: fp16 rounds the negative ones to -0, which the
        // CPU's reduce decodes to -0 (not 0 + -0 = +0).
        for (std::size_t i = 3; i < n; i += 5) g[i] *= 1e-9f;
        std::vector<float> want = g;
        ringflow::local::run(1, [&](ringflow::communicator& comm1) {
          ringflow::compressed_allreduce(comm1, std::span(want), *cpu, 5, &fb);
        });
        auto dg = upload(g);
        rc::compressed_allreduce(comm, 0, 1, dg.data(), n, dc, dr.data(), s);
        s.synchronize();
        require_same_bits(download(dg.data(), n), want, "result");
        const auto r = fb.residual(5, n);
        require_same_bits(download(dr.data(), n), std::vector<float>(r.begin(), r.end()),
                          "residual");
      }
      CHECK(dc.calls() == 3);
    }
  }
  ncclCommDestroy(comm);
}

TEST_CASE("compressed_allreduce queues everything on the stream: it captures into a CUDA graph",
          "[cuda][compress][nccl]") {
  // Stream capture in global mode fails on any call that would synchronize
  // with the host (cudaStreamSynchronize, a synchronous copy, cudaMalloc,
  // cudaFree...), so a clean capture shows there is none inside.
  int dev = 0;
  RINGFLOW_CHECK_CUDA(cudaGetDevice(&dev));
  ncclComm_t comm = nullptr;
  REQUIRE(ncclCommInitAll(&comm, 1, &dev) == ncclSuccess);
  rc::stream s;
  const std::size_t n = 100003;
  for (const char* spec : {"none", "fp16", "int8", "sign", "topk:0.01", "powersgd:4"}) {
    INFO(spec);
    rc::device_compressor dc(spec, 3);
    auto dg = upload(input(n, 1500));
    rc::device_buffer<float> dr(n);
    fill_bytes(dr.data(), 0, dr.bytes());
    // The first call sizes the workspace (a stream-ordered allocation).
    rc::compressed_allreduce(comm, 0, 1, dg.data(), n, dc, dr.data(), s);
    s.synchronize();
    REQUIRE(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal) == cudaSuccess);
    std::string failed;
    try {
      rc::compressed_allreduce(comm, 0, 1, dg.data(), n, dc, dr.data(), s);
    } catch (const std::exception& e) {
      failed = e.what();  // end the capture before failing, or the stream stays in it
    }
    cudaGraph_t graph = nullptr;
    const cudaError_t rc_end = cudaStreamEndCapture(s, &graph);
    CHECK(failed == "");
    CHECK(rc_end == cudaSuccess);
    CHECK(graph != nullptr);
    if (graph) RINGFLOW_CHECK_CUDA(cudaGraphDestroy(graph));
    cudaGetLastError();  // clear a capture error, if any, for the next spec
  }
  ncclCommDestroy(comm);
}

TEST_CASE("device_compressor rejects what it cannot do", "[cuda][compress][nccl]") {
  // Every compressor has a device implementation now (powersgd: see
  // test_powersgd_device.cpp); bad specs are still refused.
  CHECK_THROWS_AS(rc::device_compressor("powersgd:0"), ringflow::usage_error);
  CHECK_THROWS_AS(rc::device_compressor("topk:2"), ringflow::usage_error);
  CHECK(rc::device_compressor("sign:64").name() == "sign:64");
  CHECK(rc::device_compressor("powersgd:4").name() == "powersgd:4");
}
#endif  // RINGFLOW_HAS_NCCL

#endif  // RINGFLOW_HAS_CUDA
