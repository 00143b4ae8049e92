// Checks of the staged ring policy (coll/ring_staging.hpp) without a GPU: its
// "device" is host memory behind a lazy stream that runs queued copies and
// reductions late and in random-sized steps, so a send posted before its copy
// ran, or a slot reused before its reduction read it, shows up as wrong bits.
// Results must equal the CPU ring's (same data, same segment size) bit for bit.
#pragma once

#include <fmt/format.h>

#include <cstdint>
#include <cstring>
#include <deque>
#include <functional>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <string_view>
#include <vector>

#include "ringflow/coll/collectives.hpp"
#include "ringflow/coll/ring_staging.hpp"
#include "ringflow/core/dtype_visit.hpp"
#include "support/coll_checks.hpp"

namespace ringflow::testing {

/// The ops of staged_ring_memory on host memory, with a lazy in-order stream.
class lazy_host_ops {
 public:
  explicit lazy_host_ops(std::uint32_t seed) : rng_(seed) {}
  lazy_host_ops(const lazy_host_ops&) = delete;
  lazy_host_ops& operator=(const lazy_host_ops&) = delete;

  void reserve_blocks(std::size_t n, std::size_t bytes) {
    block_bytes_ = bytes;
    blocks_.assign(n * bytes, std::byte{0xAB});
  }
  void reserve_slots(std::size_t n, std::size_t bytes, bool host_too) {
    slot_bytes_ = bytes;
    dev_slots_.assign(n * bytes, std::byte{0xCD});
    if (host_too) host_slots_.assign(n * bytes, std::byte{0xEF});
  }
  std::byte* send_block(std::size_t i) { return blocks_.data() + i * block_bytes_; }
  std::byte* recv_slot(std::size_t k) { return host_slots_.data() + k * slot_bytes_; }
  std::byte* device_slot(std::size_t k) { return dev_slots_.data() + k * slot_bytes_; }
  void* partial(std::size_t bytes) {
    partial_.assign(bytes, std::byte{0x5A});
    return partial_.data();
  }

  void to_host(void* dst, const void* src, std::size_t bytes) { queue_copy(dst, src, bytes); }
  void to_device(void* dst, const void* src, std::size_t bytes) { queue_copy(dst, src, bytes); }
  void on_device(void* dst, const void* src, std::size_t bytes) { queue_copy(dst, src, bytes); }
  void reduce(dtype type, op_kind op, void* dst, const void* a, const void* b, std::size_t n) {
    tasks_.push_back([=] { host_reduce(type, op, dst, a, b, n); });
  }
  void finish(dtype type, void* dst, std::size_t n, int p) {
    tasks_.push_back([=] { host_finish(type, dst, n, p); });
  }

  int mark() {
    const std::size_t pos = executed_ + tasks_.size();
    if (!free_.empty()) {
      const int m = free_.back();
      free_.pop_back();
      marks_[static_cast<std::size_t>(m)] = pos;
      return m;
    }
    marks_.push_back(pos);
    return static_cast<int>(marks_.size()) - 1;
  }
  bool done(int m) {
    // Run at most one queued task per poll, and only every third poll: the
    // stream lags behind the host like a busy GPU does.
    if (!tasks_.empty() && rng_() % 3 == 0) run_one();
    return executed_ >= marks_[static_cast<std::size_t>(m)];
  }
  void release(int m) { free_.push_back(m); }
  void synchronize() {
    while (!tasks_.empty()) run_one();
  }
  std::size_t tasks_run() const { return executed_; }

 private:
  void queue_copy(void* dst, const void* src, std::size_t bytes) {
    tasks_.push_back([=] { std::memmove(dst, src, bytes); });
  }
  void run_one() {
    auto f = std::move(tasks_.front());
    tasks_.pop_front();
    f();
    ++executed_;
  }

  static void host_reduce(dtype type, op_kind op, void* dst, const void* a, const void* b,
                          std::size_t n) {
    visit_dtype(type, [&]<class T>(type_tag<T>) {
      T* d = static_cast<T*>(dst);
      const T* x = static_cast<const T*>(a);
      const T* y = static_cast<const T*>(b);
      auto run = [&](auto o) {
        for (std::size_t i = 0; i < n; ++i) d[i] = o(x[i], y[i]);
      };
      switch (op) {
        case op_kind::sum:
        case op_kind::avg: return run(sum_op{});
        case op_kind::prod: return run(prod_op{});
        case op_kind::min: return run(min_op{});
        case op_kind::max: return run(max_op{});
      }
    });
  }
  static void host_finish(dtype type, void* dst, std::size_t n, int p) {
    visit_dtype(type, [&]<class T>(type_tag<T>) {
      T* d = static_cast<T*>(dst);
      for (std::size_t i = 0; i < n; ++i) d[i] = avg_op{}.finish(d[i], p);
    });
  }

  std::mt19937 rng_;
  std::deque<std::function<void()>> tasks_;
  std::size_t executed_ = 0;
  std::vector<std::size_t> marks_;
  std::vector<int> free_;
  std::size_t block_bytes_ = 0, slot_bytes_ = 0;
  std::vector<std::byte> blocks_, host_slots_, dev_slots_, partial_;
};

/// When a device_pointer_like_transport's receive puts its bytes in place.
enum class landing {
  /// When test() or wait() first sees the receive complete, before it
  /// returns: the contract of cuda/ring.hpp (a completed receive has its
  /// bytes in place). tests/cuda_mpi/test_staged.cpp's device_pointer_transport
  /// does this with cudaMemcpy followed by a stream synchronize.
  at_completion,
  /// Later than that: the copy is still in flight when test() says complete,
  /// and lands only when the transport's next copy starts (an isend or the
  /// next landing) or at flush(). This is what that GPU test transport did
  /// before it synchronized: cudaMemcpy from pageable memory returns before
  /// its DMA is done, the ring's kernels run on a non-blocking stream that
  /// does not order after it, and only the next legacy-stream copy waits for
  /// it. Breaks the contract: the checks must catch it.
  late,
};

/// A transport of "device pointers" like the GPU tests' device-pointer
/// transport, over any transport: a send copies its source into a buffer of
/// its own when posted; a receive arrives in a buffer of its own and is
/// copied to its destination only when its completion is seen (test() or
/// wait()), unordered with the lazy stream's queue.
class device_pointer_like_transport final : public transport {
 public:
  device_pointer_like_transport(transport& inner, landing how) : inner_(inner), how_(how) {
    set_timeout(inner.timeout());
  }
  ~device_pointer_like_transport() override { flush(); }
  device_pointer_like_transport(const device_pointer_like_transport&) = delete;
  device_pointer_like_transport& operator=(const device_pointer_like_transport&) = delete;

  int rank() const noexcept override { return inner_.rank(); }
  int size() const noexcept override { return inner_.size(); }
  std::string_view name() const noexcept override { return "device-pointer-like"; }

  request isend(const void* data, std::size_t bytes, int peer, int tag) override {
    flush();  // an in-order copy engine: this copy starts after the last landing
    auto st = std::make_unique<state>(*this);
    st->buf.resize(bytes);
    if (bytes) std::memcpy(st->buf.data(), data, bytes);
    st->inner = inner_.isend(st->buf.data(), bytes, peer, tag);
    return request(std::move(st));
  }
  request irecv(void* data, std::size_t bytes, int peer, int tag) override {
    auto st = std::make_unique<state>(*this);
    st->buf.resize(bytes);
    st->dst = data;
    st->inner = inner_.irecv(st->buf.data(), bytes, peer, tag);
    return request(std::move(st));
  }
  std::shared_ptr<transport> split(int, int) override {
    throw not_supported_error("device_pointer_like_transport: no split");
  }

  /// Lands the copy still in flight (landing::late); the checks call it
  /// before they read a result, like the GPU test's cudaMemcpy back does.
  void flush() {
    if (late_.dst != nullptr && !late_.bytes.empty()) {
      std::memcpy(late_.dst, late_.bytes.data(), late_.bytes.size());
    }
    late_ = {};
  }

 private:
  struct in_flight {
    void* dst = nullptr;
    std::vector<std::byte> bytes;
  };
  struct state final : detail::request_state {
    explicit state(device_pointer_like_transport& owner) : owner(owner) {}
    device_pointer_like_transport& owner;
    request inner;
    std::vector<std::byte> buf;
    void* dst = nullptr;  // receive: where the bytes go
    bool landed = false;
    void land() {
      if (landed) return;
      landed = true;
      if (dst == nullptr || buf.empty()) return;
      owner.flush();
      if (owner.how_ == landing::at_completion) {
        std::memcpy(dst, buf.data(), buf.size());
      } else {
        owner.late_.dst = dst;
        owner.late_.bytes = std::move(buf);
      }
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
  landing how_;
  in_flight late_;
};

/// Inputs with fractional parts (so a different combining order would show
/// in the bits) that stay exact enough not to overflow: |x| <= 8 for sums of
/// four ranks; 1, 2, -1 or 0.5-ish factors for prod. Also the GPU tests'
/// inputs (tests/cuda_mpi/test_staged.cpp).
template <class T>
T staging_input(int rank, std::size_t i, op_kind op) {
  const std::size_t k = i * 7 + static_cast<std::size_t>(rank) * 13;
  if (op == op_kind::prod) {
    static constexpr int f[] = {1, 2, -1, 1, 3};
    if constexpr (std::is_integral_v<T>) {
      return static_cast<T>(f[k % 5]);
    } else {
      return static_cast<T>(static_cast<float>(f[k % 5]) * (k % 3 == 0 ? 0.75f : 1.0f));
    }
  }
  const int v = static_cast<int>(k % 17) - 8;
  if constexpr (std::is_integral_v<T>) {
    return static_cast<T>(v);
  } else {
    return static_cast<T>(static_cast<float>(v) * 0.37f + 0.011f * static_cast<float>(rank));
  }
}

template <class T>
void compare_bits(const std::vector<T>& got, const std::vector<T>& want, const std::string& what,
                  failures& f) {
  for (std::size_t i = 0; i < got.size() && i < want.size(); ++i) {
    if (std::memcmp(&got[i], &want[i], sizeof(T)) != 0) {
      f.push_back(fmt::format("{}: element {} is {}, the CPU ring gives {}", what, i, show(got[i]),
                              show(want[i])));
      return;
    }
  }
  if (got.size() != want.size()) f.push_back(what + ": sizes differ");
}

/// Staged (or direct) allreduce, reduce-scatter and allgather of `count`
/// elements against the CPU ring with the same segment size. With `over`,
/// the policy runs over a device_pointer_like_transport of c's transport
/// that lands its receives that way (the CPU ring still runs on c's).
template <class T, class Op>
void check_staged_ring(const communicator& c, std::size_t count, std::size_t seg, std::size_t slots,
                       detail::staging_mode mode, bool in_place, failures& f,
                       std::optional<landing> over = std::nullopt) {
  const Op op{};
  transport& cpu = c.raw();
  std::optional<device_pointer_like_transport> dev;
  if (over) dev.emplace(cpu, *over);
  transport& t = dev ? static_cast<transport&>(*dev) : cpu;
  const int p = c.size(), r = c.rank();
  const std::size_t seg_bytes = detail::segment_elems(seg, sizeof(T)) * sizeof(T);
  const std::string what =
      fmt::format("rank {}/{} {} {} count {} seg {} slots {} {} {}{}", r, p,
                  dtype_name(dtype_of<T>), op_name(Op::kind), count, seg, slots,
                  mode == detail::staging_mode::staged ? "staged" : "direct",
                  in_place ? "in place" : "out of place",
                  !over                    ? ""
                  : *over == landing::late ? " (late landing)"
                                           : " (landing at completion)");
  auto landed = [&] {
    if (dev) dev->flush();
  };
  const std::uint32_t seed =
      static_cast<std::uint32_t>(count * 31 + seg + slots * 7 + static_cast<std::size_t>(r));
  std::vector<T> in(count);
  for (std::size_t i = 0; i < count; ++i) in[i] = staging_input<T>(r, i, Op::kind);

  // allreduce
  {
    std::vector<T> want(count), got(count, static_cast<T>(-3));
    detail::ring_allreduce(cpu, in.data(), want.data(), count, op, seg);
    std::vector<T> src = in;
    lazy_host_ops ops(seed);
    detail::staged_ring_memory<lazy_host_ops> m(ops, t, mode, seg_bytes, slots);
    if (in_place) {
      detail::ring_allreduce_on(m, t, static_cast<const T*>(src.data()), src.data(), count, op,
                                seg);
      landed();
      got = src;
    } else {
      detail::ring_allreduce_on(m, t, static_cast<const T*>(src.data()), got.data(), count, op,
                                seg);
      landed();
      compare_bits(src, in, what + " allreduce changed its input", f);
    }
    compare_bits(got, want, what + " allreduce", f);
  }
  // reduce-scatter
  const chunk own = partition(count, p, r);
  {
    std::vector<T> want(own.count), got(own.count, static_cast<T>(-3));
    detail::ring_reduce_scatter(cpu, in.data(), want.data(), count, op, seg);
    std::vector<T> src = in;
    lazy_host_ops ops(seed + 1);
    detail::staged_ring_memory<lazy_host_ops> m(ops, t, mode, seg_bytes, slots);
    T* out = in_place ? src.data() + own.offset : got.data();
    detail::ring_reduce_scatter_on(m, t, static_cast<const T*>(src.data()), out, count, op, seg);
    landed();
    if (in_place)
      got.assign(src.begin() + static_cast<std::ptrdiff_t>(own.offset),
                 src.begin() + static_cast<std::ptrdiff_t>(own.offset + own.count));
    compare_bits(got, want, what + " reduce_scatter", f);
  }
  // allgather of each rank's piece of `in`
  {
    std::vector<T> want(count), got(count, static_cast<T>(-3));
    const T* piece = in.data() + own.offset;
    detail::ring_allgather(cpu, piece, want.data(), count, seg);
    lazy_host_ops ops(seed + 2);
    detail::staged_ring_memory<lazy_host_ops> m(ops, t, mode, seg_bytes, slots);
    if (in_place) {
      std::copy(piece, piece + own.count, got.begin() + static_cast<std::ptrdiff_t>(own.offset));
      piece = got.data() + own.offset;
    }
    detail::ring_allgather_on(m, t, piece, got.data(), count, seg);
    landed();
    compare_bits(got, want, what + " allgather", f);
  }
}

/// Every mode, slot count, a few dtypes and ops, counts from 0 to a few
/// thousand, segments from one element to more than a chunk.
inline void check_staged_rings(const communicator& c, failures& f) {
  const auto p = static_cast<std::size_t>(c.size());
  const std::size_t counts[] = {0, 1, 7, p + 1, 4099, 40009};
  for (auto mode : {detail::staging_mode::staged, detail::staging_mode::direct}) {
    for (std::size_t slots : {std::size_t{2}, std::size_t{4}}) {
      for (std::size_t count : counts) {
        for (std::size_t seg : {std::size_t{6}, std::size_t{1000}, std::size_t{1} << 20}) {
          if (seg < 64 && count > 1000) continue;  // thousands of messages, no new path
          const bool in_place = (count + seg + slots) % 2 == 0;
          check_staged_ring<float, sum_op>(c, count, seg, slots, mode, in_place, f);
          check_staged_ring<half, avg_op>(c, count, seg, slots, mode, !in_place, f);
          check_staged_ring<std::int32_t, min_op>(c, count, seg, slots, mode, in_place, f);
          check_staged_ring<double, prod_op>(c, count, seg, slots, mode, !in_place, f);
        }
      }
    }
  }
}

/// The GPU test of the device-direct ring at the sizes that failed on the
/// H200 (tests/cuda_mpi/test_staged.cpp, count 1048579, segments of 1 MiB and
/// 64 KiB, -np 2 and 4): direct mode over a device_pointer_like_transport
/// that lands `how`, with the GPU test's dtypes and ops.
inline void check_direct_large(const communicator& c, landing how, failures& f) {
  const std::size_t count = (std::size_t{1} << 20) + 3;
  const auto direct = detail::staging_mode::direct;
  for (std::size_t seg : {std::size_t{1} << 20, std::size_t{64} << 10}) {
    check_staged_ring<float, sum_op>(c, count, seg, 4, direct, true, f, how);
    check_staged_ring<half, avg_op>(c, count, seg, 4, direct, false, f, how);
    check_staged_ring<std::int64_t, min_op>(c, count, seg, 4, direct, true, f, how);
    check_staged_ring<double, sum_op>(c, count, seg, 4, direct, false, f, how);
  }
}

}  // namespace ringflow::testing
