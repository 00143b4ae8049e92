// The staged MPI path (device buffers over a host-memory MPI transport, ranks
// sharing one GPU) and the device-direct ring, each against ringflow's CPU
// ring on the same data with the same segment size: bit for bit.
#include "support/catch.hpp"

#if RINGFLOW_HAS_CUDA
#include <cuda_runtime_api.h>
#include <fmt/format.h>

#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "ringflow/backends/mpi.hpp"
#include "ringflow/coll/collectives.hpp"
#include "ringflow/cuda/check.hpp"
#include "ringflow/cuda/ring.hpp"
#include "ringflow/cuda/runtime.hpp"
#include "support/coll_checks.hpp"
#include "support/collect.hpp"
#include "support/staging_checks.hpp"

using namespace ringflow;
using ringflow::testing::failures;
using ringflow::testing::require_none;
namespace rc = ringflow::cuda;

namespace {

constexpr std::size_t mib = std::size_t{1} << 20;

template <class T>
std::vector<T> inputs(int rank, std::size_t count, op_kind op) {
  std::vector<T> v(count);
  for (std::size_t i = 0; i < count; ++i) v[i] = testing::staging_input<T>(rank, i, op);
  return v;
}

template <class T>
void to_device(rc::device_buffer<T>& d, const std::vector<T>& h, std::size_t offset = 0) {
  if (h.empty()) return;
  RINGFLOW_CHECK_CUDA(
      cudaMemcpy(d.data() + offset, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice));
}

template <class T>
std::vector<T> to_host(const T* d, std::size_t n) {
  std::vector<T> h(n);
  if (n) RINGFLOW_CHECK_CUDA(cudaMemcpy(h.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost));
  return h;
}

std::vector<std::size_t> counts(int p) {
  return {0, 1, 7, static_cast<std::size_t>(p) + 1, 4099, mib + 3};
}

/// Segment sizes per count: the default and one that cuts every chunk into
/// more segments than there are staging slots (down to one element).
std::vector<std::size_t> segments(std::size_t count) {
  if (count >= mib) return {rc::default_staged_segment_bytes, 64 * 1024};
  if (count >= 4096) return {rc::default_staged_segment_bytes, 1000};
  return {rc::default_staged_segment_bytes, 6};
}

template <class T, class Op>
void check_allreduce(const communicator& c, std::size_t count, std::size_t seg, bool in_place,
                     failures& f) {
  const Op op{};
  const std::vector<T> in = inputs<T>(c.rank(), count, Op::kind);
  std::vector<T> want(count);
  allreduce(c, std::span<const T>(in), std::span<T>(want), op, coll_options{algo::ring, seg});

  rc::device_buffer<T> d_in(count), d_out(count);
  to_device(d_in, in);
  rc::staged_options opt;
  opt.segment_bytes = seg;
  std::vector<T> got;
  if (in_place) {
    rc::staged_allreduce(c, std::span<T>(d_in.data(), count), op, opt);
    got = to_host(d_in.data(), count);
  } else {
    rc::staged_allreduce(c, std::span<const T>(d_in.data(), count),
                         std::span<T>(d_out.data(), count), op, opt);
    got = to_host(d_out.data(), count);
    testing::compare_bits(to_host(d_in.data(), count), in, "staged allreduce changed its input", f);
  }
  testing::compare_bits(got, want,
                        fmt::format("rank {}: staged allreduce {} {} count {} seg {} {}", c.rank(),
                                    dtype_name(dtype_of<T>), op_name(Op::kind), count, seg,
                                    in_place ? "in place" : "out of place"),
                        f);
}

template <class T, class Op>
void check_reduce_scatter(const communicator& c, std::size_t count, std::size_t seg, bool in_place,
                          failures& f) {
  const Op op{};
  const chunk own = partition(count, c.size(), c.rank());
  const std::vector<T> in = inputs<T>(c.rank(), count, Op::kind);
  std::vector<T> want(own.count);
  reduce_scatter(c, std::span<const T>(in), std::span<T>(want), op, coll_options{algo::ring, seg});

  rc::device_buffer<T> d_in(count), d_out(own.count);
  to_device(d_in, in);
  rc::staged_options opt;
  opt.segment_bytes = seg;
  T* out = in_place ? d_in.data() + own.offset : d_out.data();
  rc::staged_reduce_scatter(c, std::span<const T>(d_in.data(), count), std::span<T>(out, own.count),
                            op, opt);
  testing::compare_bits(to_host(out, own.count), want,
                        fmt::format("rank {}: staged reduce_scatter {} {} count {} seg {} {}",
                                    c.rank(), dtype_name(dtype_of<T>), op_name(Op::kind), count,
                                    seg, in_place ? "in place" : "out of place"),
                        f);
}

template <class T>
void check_allgather(const communicator& c, std::size_t count, std::size_t seg, bool in_place,
                     failures& f) {
  const chunk own = partition(count, c.size(), c.rank());
  const std::vector<T> piece = inputs<T>(c.rank(), own.count, op_kind::sum);
  std::vector<T> want(count);
  allgather(c, std::span<const T>(piece), std::span<T>(want), coll_options{algo::ring, seg});

  rc::device_buffer<T> d_piece(own.count), d_out(count);
  const T* in = d_piece.data();
  if (in_place) {
    to_device(d_out, piece, own.offset);
    in = d_out.data() + own.offset;
  } else {
    to_device(d_piece, piece);
  }
  rc::staged_options opt;
  opt.segment_bytes = seg;
  rc::staged_allgather(c, std::span<const T>(in, own.count), std::span<T>(d_out.data(), count),
                       opt);
  testing::compare_bits(
      to_host(d_out.data(), count), want,
      fmt::format("rank {}: staged allgather {} count {} seg {} {}", c.rank(),
                  dtype_name(dtype_of<T>), count, seg, in_place ? "in place" : "out of place"),
      f);
}

template <class T>
void check_type(const communicator& c, failures& f) {
  for (std::size_t count : counts(c.size())) {
    for (std::size_t seg : segments(count)) {
      for (bool in_place : {false, true}) {
        check_allreduce<T, sum_op>(c, count, seg, in_place, f);
        check_allreduce<T, prod_op>(c, count, seg, in_place, f);
        check_allreduce<T, min_op>(c, count, seg, in_place, f);
        check_allreduce<T, max_op>(c, count, seg, in_place, f);
        check_allreduce<T, avg_op>(c, count, seg, in_place, f);
        check_reduce_scatter<T, sum_op>(c, count, seg, in_place, f);
        check_reduce_scatter<T, max_op>(c, count, seg, in_place, f);
        check_reduce_scatter<T, avg_op>(c, count, seg, in_place, f);
        check_allgather<T>(c, count, seg, in_place, f);
      }
    }
  }
}

// A transport whose buffers are device pointers, built on MPI for the test:
// it copies through host memory inside isend and inside the requests, so from
// the outside it behaves like a device-pointer transport (NCCL p2p,
// CUDA-aware MPI) and keeps the contract of cuda/ring.hpp: a send reads its
// bytes before isend returns; a receive lands when test() or wait() first
// sees it complete, and its bytes are on the device before that returns.
// The copies run on a stream of the transport's own, synchronized: on the
// H200 (commit 40f82bd) a plain cudaMemcpy from pageable memory returned
// before its DMA was done, the ring's reduction on its non-blocking stream
// read the slot first, and the results held the slot's previous contents.
// tests/support/staging_checks.hpp (landing::late) shows that on the CPU.
class device_pointer_transport final : public transport {
 public:
  explicit device_pointer_transport(transport& inner)
      : inner_(inner), copies_(std::make_shared<rc::stream>()) {
    set_timeout(inner.timeout());
  }
  int rank() const noexcept override { return inner_.rank(); }
  int size() const noexcept override { return inner_.size(); }
  std::string_view name() const noexcept override { return "device-pointer-test"; }

  request isend(const void* data, std::size_t bytes, int peer, int tag) override {
    auto st = std::make_unique<state>(copies_);
    st->host.resize(bytes);
    if (bytes) {
      // The ring posts a send once the work that wrote its bytes is done.
      RINGFLOW_CHECK_CUDA(
          cudaMemcpyAsync(st->host.data(), data, bytes, cudaMemcpyDeviceToHost, copies_->get()));
      copies_->synchronize();
    }
    st->inner = inner_.isend(st->host.data(), bytes, peer, tag);
    return request(std::move(st));
  }
  request irecv(void* data, std::size_t bytes, int peer, int tag) override {
    auto st = std::make_unique<state>(copies_);
    st->host.resize(bytes);
    st->device = data;
    st->inner = inner_.irecv(st->host.data(), bytes, peer, tag);
    return request(std::move(st));
  }
  std::shared_ptr<transport> split(int, int) override {
    throw not_supported_error("device_pointer_transport: no split");
  }

 private:
  struct state final : ringflow::detail::request_state {
    explicit state(std::shared_ptr<rc::stream> s) : copies(std::move(s)) {}
    std::shared_ptr<rc::stream> copies;  // outlives the transport if need be
    request inner;
    std::vector<std::byte> host;
    void* device = nullptr;  // receive: where the bytes go once they arrived
    bool landed = false;
    void land() {
      if (device != nullptr && !landed && !host.empty()) {
        RINGFLOW_CHECK_CUDA(cudaMemcpyAsync(device, host.data(), host.size(),
                                            cudaMemcpyHostToDevice, copies->get()));
        // Complete means landed: the ring queues its reduction of these
        // bytes on another stream as soon as test() says true.
        copies->synchronize();
      }
      landed = true;
    }
    bool test() override {
      if (!inner.test()) return false;
      land();
      return true;
    }
    void wait() override {
      inner.wait();
      land();
    }
  };
  transport& inner_;
  std::shared_ptr<rc::stream> copies_;
};

template <class T, class Op>
void check_direct_allreduce(const communicator& c, std::size_t count, std::size_t seg,
                            failures& f) {
  const Op op{};
  const std::vector<T> in = inputs<T>(c.rank(), count, Op::kind);
  std::vector<T> want(count);
  allreduce(c, std::span<const T>(in), std::span<T>(want), op, coll_options{algo::ring, seg});

  rc::device_buffer<T> d(count);
  to_device(d, in);
  device_pointer_transport t(c.raw());
  const std::size_t seg_elems = detail::segment_elems(seg, sizeof(T));
  {
    rc::device_ring_memory m(t, rc::ring_memory_mode::direct, seg_elems * sizeof(T));
    detail::ring_allreduce_on(m, t, static_cast<const T*>(d.data()), d.data(), count, op, seg);
  }
  testing::compare_bits(
      to_host(d.data(), count), want,
      fmt::format("rank {}: device-direct allreduce {} {} count {} seg {}", c.rank(),
                  dtype_name(dtype_of<T>), op_name(Op::kind), count, seg),
      f);
}

template <class T>
void check_direct_gather(const communicator& c, std::size_t count, std::size_t seg, failures& f) {
  const chunk own = partition(count, c.size(), c.rank());
  const std::vector<T> in = inputs<T>(c.rank(), count, op_kind::sum);
  std::vector<T> want_rs(own.count), want_ag(count);
  reduce_scatter(c, std::span<const T>(in), std::span<T>(want_rs), sum,
                 coll_options{algo::ring, seg});
  allgather(c, std::span<const T>(want_rs), std::span<T>(want_ag), coll_options{algo::ring, seg});

  rc::device_buffer<T> d_in(count), d_piece(own.count), d_out(count);
  to_device(d_in, in);
  device_pointer_transport t(c.raw());
  const std::size_t seg_bytes = detail::segment_elems(seg, sizeof(T)) * sizeof(T);
  {
    rc::device_ring_memory m(t, rc::ring_memory_mode::direct, seg_bytes);
    detail::ring_reduce_scatter_on(m, t, static_cast<const T*>(d_in.data()), d_piece.data(), count,
                                   sum, seg);
  }
  {
    rc::device_ring_memory m(t, rc::ring_memory_mode::direct, seg_bytes);
    detail::ring_allgather_on(m, t, static_cast<const T*>(d_piece.data()), d_out.data(), count,
                              seg);
  }
  const std::string what = fmt::format("rank {}: device-direct {} count {} seg {}", c.rank(),
                                       dtype_name(dtype_of<T>), count, seg);
  testing::compare_bits(to_host(d_piece.data(), own.count), want_rs, what + " reduce_scatter", f);
  testing::compare_bits(to_host(d_out.data(), count), want_ag, what + " allgather", f);
}

}  // namespace

TEST_CASE("staged: float matches the CPU ring bit for bit", "[cuda][staged]") {
  auto world = mpi::world();
  failures f;
  check_type<float>(world, f);
  require_none(f);
}

TEST_CASE("staged: double matches the CPU ring bit for bit", "[cuda][staged]") {
  auto world = mpi::world();
  failures f;
  check_type<double>(world, f);
  require_none(f);
}

TEST_CASE("staged: half and bfloat16 match the CPU ring bit for bit", "[cuda][staged]") {
  auto world = mpi::world();
  failures f;
  check_type<half>(world, f);
  check_type<bfloat16>(world, f);
  require_none(f);
}

TEST_CASE("staged: int32 and int64 match the CPU ring bit for bit", "[cuda][staged]") {
  auto world = mpi::world();
  failures f;
  check_type<std::int32_t>(world, f);
  check_type<std::int64_t>(world, f);
  require_none(f);
}

TEST_CASE("staged: two slots and a slow stream still give the CPU ring's bits", "[cuda][staged]") {
  auto world = mpi::world();
  failures f;
  const std::size_t count = 200003;
  const std::vector<float> in = inputs<float>(world.rank(), count, op_kind::sum);
  std::vector<float> want(count);
  allreduce(world, std::span<const float>(in), std::span<float>(want), sum,
            coll_options{algo::ring, 4096});
  rc::device_buffer<float> d(count);
  rc::stream user;
  // The input is written on the caller's stream, and the collective must
  // wait for it (staged_options::stream) rather than read stale memory.
  RINGFLOW_CHECK_CUDA(cudaMemsetAsync(d.data(), 0, d.bytes(), user));
  RINGFLOW_CHECK_CUDA(
      cudaMemcpyAsync(d.data(), in.data(), count * sizeof(float), cudaMemcpyHostToDevice, user));
  rc::staged_options opt;
  opt.segment_bytes = 4096;
  opt.slots = 2;
  opt.stream = user;
  rc::staged_allreduce(world, std::span<float>(d.data(), count), sum, opt);
  testing::compare_bits(to_host(d.data(), count), want, "slots=2 with a user stream", f);
  require_none(f);
}

TEST_CASE("staged: broadcast from the first and the last rank", "[cuda][staged]") {
  auto world = mpi::world();
  failures f;
  for (int root : {0, world.size() - 1}) {
    for (std::size_t count : {std::size_t{0}, std::size_t{5}, mib + 3}) {
      std::vector<double> want = inputs<double>(root, count, op_kind::sum);
      rc::device_buffer<double> d(count);
      to_device(d, inputs<double>(world.rank(), count, op_kind::sum));
      rc::staged_options opt;
      opt.segment_bytes = 100000;  // several windows, the last one short
      rc::staged_broadcast(world, std::span<double>(d.data(), count), root, opt);
      testing::compare_bits(
          to_host(d.data(), count), want,
          fmt::format("rank {}: staged broadcast from {} count {}", world.rank(), root, count), f);
    }
  }
  require_none(f);
}

TEST_CASE("device-direct ring over a device-pointer transport matches the CPU ring",
          "[cuda][direct]") {
  auto world = mpi::world();
  failures f;
  for (std::size_t count : counts(world.size())) {
    for (std::size_t seg : segments(count)) {
      check_direct_allreduce<float, sum_op>(world, count, seg, f);
      check_direct_allreduce<half, avg_op>(world, count, seg, f);
      check_direct_allreduce<std::int64_t, min_op>(world, count, seg, f);
      check_direct_gather<double>(world, count, seg, f);
    }
  }
  require_none(f);
}

TEST_CASE("staged: host pointers are refused with the rank in the message", "[cuda][staged]") {
  auto world = mpi::world();
  std::vector<float> host(16, 1.0f);
  try {
    rc::staged_allreduce(world, std::span<float>(host), sum);
    FAIL("staged_allreduce took a host pointer");
  } catch (const usage_error& e) {
    const std::string what = e.what();
    INFO(what);
    CHECK(what.find(fmt::format("rank {}", world.rank())) != std::string::npos);
    CHECK(what.find("device pointers") != std::string::npos);
    CHECK(what.find("ordinary host") != std::string::npos);
  }
  rc::pinned_buffer<float> pinned(16);
  rc::device_buffer<float> dev(16);
  CHECK_THROWS_AS(rc::staged_allreduce(world, std::span<const float>(pinned.data(), 16),
                                       std::span<float>(dev.data(), 16), sum),
                  usage_error);
  rc::staged_options two_few;
  two_few.slots = 1;
  CHECK_THROWS_AS(rc::staged_allreduce(world, std::span<float>(dev.data(), 16), sum, two_few),
                  usage_error);
  // Nothing was sent: the communicator still works.
  rc::staged_allreduce(world, std::span<float>(dev.data(), 16), sum);
}

TEST_CASE("staged: mismatched counts across ranks are a usage error on every rank",
          "[cuda][staged]") {
  auto world = mpi::world();
  if (world.size() < 2 || world.check_mode() != check_mode::full)
    return;  // the test main sets full
  const std::size_t count = world.rank() == 0 ? 100 : 101;
  rc::device_buffer<float> d(count);
  try {
    rc::staged_allreduce(world, std::span<float>(d.data(), count), sum);
    FAIL("mismatched counts were not detected");
  } catch (const usage_error& e) {
    INFO(e.what());
    CHECK(std::string(e.what()).find("rank") != std::string::npos);
  }
}
#endif  // RINGFLOW_HAS_CUDA
