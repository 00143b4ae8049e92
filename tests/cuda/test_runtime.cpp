// The CUDA runtime wrappers and the device reduction, against the CPU ops.
#include "support/catch.hpp"

#if RINGFLOW_HAS_CUDA
#include <cuda_runtime_api.h>

#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "ringflow/core/reduce_op.hpp"
#include "ringflow/cuda/check.hpp"
#include "ringflow/cuda/reduce.hpp"
#include "ringflow/cuda/runtime.hpp"

namespace rc = ringflow::cuda;

TEST_CASE("a failed CUDA call throws cuda_error naming the call and rank", "[cuda]") {
  rc::set_error_rank(5);
  void* p = nullptr;
  // Far more than any GPU has: cudaErrorMemoryAllocation.
  try {
    RINGFLOW_CHECK_CUDA(cudaMalloc(&p, std::size_t{1} << 60));
    FAIL("cudaMalloc of 2^60 bytes succeeded");
  } catch (const rc::cuda_error& e) {
    const std::string what = e.what();
    INFO(what);
    CHECK(what.find("rank 5") != std::string::npos);
    CHECK(what.find("cudaMalloc") != std::string::npos);
    CHECK(e.code() == cudaErrorMemoryAllocation);
  }
  rc::set_error_rank(-1);
  // The error was cleared: the next call succeeds.
  rc::device_buffer<float> ok(16);
  CHECK(ok.data() != nullptr);
}

TEST_CASE("device and pinned buffers round-trip through a stream", "[cuda]") {
  const std::size_t n = 100003;
  rc::pinned_buffer<float> host(n);
  for (std::size_t i = 0; i < n; ++i) host[i] = static_cast<float>(i) * 0.5f - 7.0f;
  rc::device_buffer<float> dev(n);
  rc::stream s;
  RINGFLOW_CHECK_CUDA(
      cudaMemcpyAsync(dev.data(), host.data(), dev.bytes(), cudaMemcpyHostToDevice, s));
  std::vector<float> back(n, -1.0f);
  RINGFLOW_CHECK_CUDA(
      cudaMemcpyAsync(back.data(), dev.data(), dev.bytes(), cudaMemcpyDeviceToHost, s));
  s.synchronize();
  for (std::size_t i = 0; i < n; ++i) REQUIRE(back[i] == host[i]);
  CHECK(rc::pointer_kind(dev.data()) == rc::memory_kind::device);
  CHECK(rc::pointer_kind(host.data()) == rc::memory_kind::pinned);

  rc::device_buffer<float> moved = std::move(dev);
  CHECK(dev.data() == nullptr);
  CHECK(moved.size() == n);
}

TEST_CASE("events order streams and time work", "[cuda]") {
  rc::stream a, b;
  rc::event start(true), stop(true), done;
  rc::device_buffer<int> x(1 << 20);
  start.record(a);
  RINGFLOW_CHECK_CUDA(cudaMemsetAsync(x.data(), 0x11, x.bytes(), a));
  stop.record(a);
  done.record(a);
  done.wait_on(b);  // b's copy must see a's memset
  std::vector<int> back(x.size());
  RINGFLOW_CHECK_CUDA(cudaMemcpyAsync(back.data(), x.data(), x.bytes(), cudaMemcpyDeviceToHost, b));
  b.synchronize();
  CHECK(done.query());
  CHECK(back.front() == 0x11111111);
  CHECK(back.back() == 0x11111111);
  CHECK(rc::event::elapsed_ms(start, stop) >= 0.0f);
}

namespace {
template <class T, class Op>
void check_reduce(ringflow::op_kind kind, std::size_t n, std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> dist(-50, 50);
  std::vector<T> a(n), b(n), want(n), got(n);
  for (std::size_t i = 0; i < n; ++i) {
    a[i] = static_cast<T>(dist(rng) * (std::is_integral_v<T> ? 1 : 0.37));
    b[i] = static_cast<T>(dist(rng) * (std::is_integral_v<T> ? 1 : 0.91));
    want[i] = Op{}(a[i], b[i]);
  }
  rc::device_buffer<T> da(n), db(n);
  rc::stream s;
  RINGFLOW_CHECK_CUDA(
      cudaMemcpyAsync(da.data(), a.data(), n * sizeof(T), cudaMemcpyHostToDevice, s));
  RINGFLOW_CHECK_CUDA(
      cudaMemcpyAsync(db.data(), b.data(), n * sizeof(T), cudaMemcpyHostToDevice, s));
  rc::reduce(ringflow::dtype_of<T>, kind, da.data(), da.data(), db.data(), n, s);  // in place
  RINGFLOW_CHECK_CUDA(
      cudaMemcpyAsync(got.data(), da.data(), n * sizeof(T), cudaMemcpyDeviceToHost, s));
  s.synchronize();
  for (std::size_t i = 0; i < n; ++i) {
    INFO("i=" << i);
    REQUIRE(std::memcmp(&got[i], &want[i], sizeof(T)) == 0);
  }
}
}  // namespace

TEST_CASE("device reduce matches the CPU ops bit for bit", "[cuda]") {
  using ringflow::op_kind;
  for (std::size_t n : {std::size_t{1}, std::size_t{7}, std::size_t{4099}, std::size_t{1} << 20}) {
    check_reduce<float, ringflow::sum_op>(op_kind::sum, n, 1);
    check_reduce<double, ringflow::prod_op>(op_kind::prod, n, 2);
    check_reduce<std::int32_t, ringflow::min_op>(op_kind::min, n, 3);
    check_reduce<std::int64_t, ringflow::max_op>(op_kind::max, n, 4);
    check_reduce<ringflow::half, ringflow::sum_op>(op_kind::sum, n, 5);
    check_reduce<ringflow::bfloat16, ringflow::sum_op>(op_kind::sum, n, 6);
  }
}
#endif  // RINGFLOW_HAS_CUDA
