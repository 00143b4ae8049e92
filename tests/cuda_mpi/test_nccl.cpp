// The NCCL backend under mpirun (-np 1, 2, 4).
//
// Where some host has more ranks than GPUs (one GPU and -np 2 or 4), NCCL
// cannot be built: the test checks that building the communicator throws the
// "same GPU" usage_error on every rank, and the other cases skip. Where each
// rank has its own GPU, every collective x dtype x op x count runs in place
// and out of place against a reference computed on the host from every
// rank's input (each rank regenerates the others' inputs from their seeds):
// integers bit-exact; floats bit-exact at one rank, else within a tolerance
// (NCCL's reduction order is its own). The ring over ncclSend/ncclRecv must
// equal ringflow's CPU ring bit for bit.
#include "support/catch.hpp"

#if RINGFLOW_HAS_NCCL
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include "ringflow/backends/mpi.hpp"
#include "ringflow/coll/collectives.hpp"
#include "ringflow/cuda/check.hpp"
#include "ringflow/cuda/device.hpp"
#include "ringflow/cuda/nccl.hpp"
#include "ringflow/cuda/runtime.hpp"

namespace rc = ringflow::cuda;
using ringflow::op_kind;

namespace {

ringflow::communicator& world() {
  static ringflow::communicator w = ringflow::mpi::world();
  return w;
}

/// True (on every rank alike) when some host runs more ranks than it has
/// GPUs, so the default device choice puts two ranks on one GPU.
bool gpus_shared() {
  static const bool shared = [] {
    auto& w = world();
    struct rec {
      char host[64];
      std::int32_t gpus;
    } mine{};
    gethostname(mine.host, sizeof mine.host - 1);
    mine.gpus = rc::device_count();
    std::vector<rec> all(static_cast<std::size_t>(w.size()));
    ringflow::allgather<std::uint8_t>(
        w, std::span<const std::uint8_t>(reinterpret_cast<const std::uint8_t*>(&mine), sizeof mine),
        std::span<std::uint8_t>(reinterpret_cast<std::uint8_t*>(all.data()),
                                all.size() * sizeof(rec)));
    std::map<std::string, int> ranks_on;
    std::map<std::string, int> gpus_on;
    for (const auto& r : all) {
      const std::string h(r.host, strnlen(r.host, sizeof r.host));
      ++ranks_on[h];
      gpus_on[h] = r.gpus;
    }
    for (const auto& [h, n] : ranks_on) {
      if (n > gpus_on[h]) return true;
    }
    return false;
  }();
  return shared;
}

/// The process's NCCL communicator (built once), or nullptr where GPUs are shared.
rc::nccl_communicator* nccl() {
  static std::unique_ptr<rc::nccl_communicator> c = [] {
    std::unique_ptr<rc::nccl_communicator> made;
    if (!gpus_shared()) made = std::make_unique<rc::nccl_communicator>(world());
    return made;
  }();
  return c.get();
}

// --- Inputs every rank can regenerate -----------------------------------------

std::uint64_t mix(std::uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

/// A whole number in [lo, hi] for (seed, rank, i).
long long pick(std::uint64_t seed, int rank, std::size_t i, long long lo, long long hi) {
  const std::uint64_t h =
      mix(seed ^ (static_cast<std::uint64_t>(rank) << 40) ^ (i * 0x100000001b3ULL));
  return lo + static_cast<long long>(h % static_cast<std::uint64_t>(hi - lo + 1));
}

template <class T>
constexpr bool is_float_v = ringflow::dtype_traits<T>::is_floating;

/// Element i of `rank`'s input for an op. Ranges keep every result exact in
/// T (no integer overflow for up to 7 ranks; floats are small multiples of
/// 1/8, or powers of two for prod, so sums and products are exact too).
template <class T>
T value(op_kind op, std::uint64_t seed, int rank, std::size_t i) {
  if constexpr (is_float_v<T>) {
    if (op == op_kind::prod) {
      static constexpr double choices[] = {-2.0, -1.0, -0.5, 0.5, 1.0, 2.0};
      return static_cast<T>(choices[pick(seed, rank, i, 0, 5)]);
    }
    const long long k = op == op_kind::min || op == op_kind::max ? pick(seed, rank, i, -2000, 2000)
                                                                 : pick(seed, rank, i, -32, 32);
    return static_cast<T>(static_cast<double>(k) / 8.0);
  } else {
    long long lo = 0, hi = 0;
    const bool is_signed = std::is_signed_v<T>;
    switch (op) {
      case op_kind::sum:
      case op_kind::avg:
        hi =
            sizeof(T) == 1 ? (is_signed ? 15 : 31) : (sizeof(T) == 4 ? 100000000 : 1000000000000LL);
        lo = is_signed ? -hi : 0;
        break;
      case op_kind::prod:
        hi = sizeof(T) == 1 ? 1 : (sizeof(T) == 4 ? 6 : 150);
        lo = is_signed ? -hi : 0;
        if (sizeof(T) == 1 && !is_signed) hi = 2;  // 2^7 < 255: up to 7 ranks
        break;
      case op_kind::min:
      case op_kind::max:
        lo = sizeof(T) == 8 ? -(1LL << 61) : static_cast<long long>(std::numeric_limits<T>::min());
        hi = sizeof(T) == 8 ? (1LL << 61) : static_cast<long long>(std::numeric_limits<T>::max());
        break;
    }
    return static_cast<T>(pick(seed, rank, i, lo, hi));
  }
}

template <class T>
std::vector<T> input(op_kind op, std::uint64_t seed, int rank, std::size_t n,
                     std::size_t from = 0) {
  std::vector<T> v(n);
  for (std::size_t i = 0; i < n; ++i) v[i] = value<T>(op, seed, rank, from + i);
  return v;
}

double as_double(float x) { return x; }
double as_double(double x) { return x; }
double as_double(ringflow::half x) { return static_cast<float>(x); }
double as_double(ringflow::bfloat16 x) { return static_cast<float>(x); }

template <class T>
double epsilon() {
  if constexpr (std::is_same_v<T, float>) return 0x1p-23;
  if constexpr (std::is_same_v<T, double>) return 0x1p-52;
  if constexpr (std::is_same_v<T, ringflow::half>) return 0x1p-10;
  return 0x1p-7;  // bfloat16
}

template <class Fn>
void with_op(op_kind op, Fn&& fn) {
  switch (op) {
    case op_kind::sum: return fn(ringflow::sum);
    case op_kind::prod: return fn(ringflow::prod);
    case op_kind::min: return fn(ringflow::min);
    case op_kind::max: return fn(ringflow::max);
    case op_kind::avg: return fn(ringflow::avg);
  }
}

/// Element i of the reduction over all ranks, folded in rank order with
/// ringflow's own functors (exact for integers, whose ops are associative).
template <class T, class Op>
T integer_reference(op_kind op, std::uint64_t seed, int p, std::size_t i, const Op& fn) {
  T acc = value<T>(op, seed, 0, i);
  for (int q = 1; q < p; ++q) acc = fn(acc, value<T>(op, seed, q, i));
  return ringflow::finish(fn, acc, p);
}

/// Counts elements of `got` (the reduction of elements [from, from + n))
/// that miss the reference.
template <class T>
std::size_t reduction_misses(const std::vector<T>& got, op_kind op, std::uint64_t seed, int p,
                             std::size_t from) {
  std::size_t misses = 0;
  with_op(op, [&](auto fn) {
    for (std::size_t k = 0; k < got.size(); ++k) {
      const std::size_t i = from + k;
      if constexpr (!is_float_v<T>) {
        if (got[k] != integer_reference<T>(op, seed, p, i, fn)) ++misses;
      } else if (p == 1) {
        // One rank: the input itself (avg multiplies or divides by 1).
        const T want = value<T>(op, seed, 0, i);
        if (std::memcmp(&got[k], &want, sizeof(T)) != 0) ++misses;
      } else {
        double ref = 0, mag = 0;
        for (int q = 0; q < p; ++q) {
          const double x = as_double(value<T>(op, seed, q, i));
          mag += std::fabs(x);
          if (q == 0) {
            ref = x;
          } else if (op == op_kind::sum || op == op_kind::avg) {
            ref += x;
          } else if (op == op_kind::prod) {
            ref *= x;
          } else if (op == op_kind::min) {
            ref = std::min(ref, x);
          } else {
            ref = std::max(ref, x);
          }
        }
        if (op == op_kind::avg) ref /= p;
        const double tol = (p + 2) * epsilon<T>() * (mag + std::fabs(ref));
        if (!(std::fabs(as_double(got[k]) - ref) <= tol)) ++misses;
      }
    }
  });
  return misses;
}

/// Copies host data to the device and waits until it is there. cudaMemcpy
/// from pageable memory may return before its DMA lands, and the collectives
/// run on a non-blocking stream that does not wait for the legacy stream.
template <class T>
void upload(T* dst, const T* src, std::size_t n) {
  if (n == 0) return;
  RINGFLOW_CHECK_CUDA(cudaMemcpy(dst, src, n * sizeof(T), cudaMemcpyHostToDevice));
  RINGFLOW_CHECK_CUDA(cudaDeviceSynchronize());
}

template <class T>
rc::device_buffer<T> to_device(const std::vector<T>& host) {
  rc::device_buffer<T> d(host.size());
  upload(d.data(), host.data(), host.size());
  return d;
}

template <class T>
std::vector<T> to_host(const T* d, std::size_t n) {
  std::vector<T> h(n);
  if (n) RINGFLOW_CHECK_CUDA(cudaMemcpy(h.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost));
  return h;
}

const std::size_t counts[] = {0, 1, 7, 4099, (std::size_t{1} << 20) + 3};
const op_kind ops[] = {op_kind::sum, op_kind::prod, op_kind::min, op_kind::max, op_kind::avg};

/// Runs fn.template operator()<T>() for every element type.
template <class Fn>
void for_each_type(Fn&& fn) {
  fn.template operator()<float>();
  fn.template operator()<double>();
  fn.template operator()<ringflow::half>();
  fn.template operator()<ringflow::bfloat16>();
  fn.template operator()<std::int8_t>();
  fn.template operator()<std::uint8_t>();
  fn.template operator()<std::int32_t>();
  fn.template operator()<std::int64_t>();
}

}  // namespace

TEST_CASE("building the NCCL communicator: own GPUs work, a shared GPU is refused on every rank",
          "[cuda][nccl]") {
  auto& w = world();
  if (gpus_shared()) {
    std::string what;
    bool usage = false;
    try {
      rc::nccl_communicator c(w);
    } catch (const ringflow::usage_error& e) {
      usage = true;
      what = e.what();
    }
    INFO(what);
    CHECK(usage);
    CHECK(what.find("share GPU") != std::string::npos);
    CHECK(what.find("staged MPI path") != std::string::npos);
    CHECK(what.find("rank " + std::to_string(w.rank())) != std::string::npos);
    // Every rank threw (none went on into NCCL to hang there).
    int threw = usage ? 1 : 0;
    ringflow::allreduce(w, std::span<int>(&threw, 1), ringflow::min);
    CHECK(threw == 1);
    // An explicit device on every rank is refused alike.
    CHECK_THROWS_AS(rc::nccl_communicator(w, rc::nccl_options{0}), ringflow::usage_error);
    return;
  }
  rc::nccl_communicator* c = nccl();
  REQUIRE(c != nullptr);
  CHECK(c->rank() == w.rank());
  CHECK(c->size() == w.size());
  CHECK(c->raw() != nullptr);
  CHECK(c->device() >= 0);
  CHECK(c->device() < rc::device_count());
  CHECK(c->base().rank() == w.rank());
  CHECK(rc::error_rank() == w.rank());
  int current = -1;
  RINGFLOW_CHECK_CUDA(cudaGetDevice(&current));
  CHECK(current == c->device());
  // A GPU index that does not exist is refused on every rank.
  CHECK_THROWS_AS(rc::nccl_communicator(w, rc::nccl_options{1000}), ringflow::usage_error);
}

TEST_CASE("nccl allreduce: every dtype, op and count, in place and out of place", "[cuda][nccl]") {
  rc::nccl_communicator* c = nccl();
  if (c == nullptr) {
    SUCCEED("ranks share a GPU: NCCL is not built (see the first case)");
    return;
  }
  const int p = c->size(), r = c->rank();
  rc::stream s;
  std::uint64_t seed = 100;
  for_each_type([&]<class T>() {
    for (op_kind op : ops) {
      for (std::size_t n : counts) {
        for (bool in_place : {false, true}) {
          ++seed;
          INFO(ringflow::dtype_name(ringflow::dtype_of<T>)
               << " " << ringflow::op_name(op) << " n=" << n << " in_place=" << in_place);
          const std::vector<T> mine = input<T>(op, seed, r, n);
          rc::device_buffer<T> in = to_device(mine);
          rc::device_buffer<T> out(in_place ? 0 : n);
          with_op(op, [&](auto fn) {
            if (in_place) {
              c->allreduce(in.span(), fn, s);
            } else {
              c->allreduce<T>(std::span<const T>(in.span()), out.span(), fn, s);
            }
          });
          s.synchronize();
          const auto got = to_host(in_place ? in.data() : out.data(), n);
          CHECK(reduction_misses(got, op, seed, p, 0) == 0);
          if (!in_place) {  // input untouched
            CHECK(std::memcmp(to_host(in.data(), n).data(), mine.data(), n * sizeof(T)) == 0);
          }
        }
      }
    }
  });
}

TEST_CASE("nccl reduce_scatter: ringflow's partition for every count, in place and out of place",
          "[cuda][nccl]") {
  rc::nccl_communicator* c = nccl();
  if (c == nullptr) {
    SUCCEED("ranks share a GPU");
    return;
  }
  const int p = c->size(), r = c->rank();
  rc::stream s;
  std::uint64_t seed = 5000;
  for_each_type([&]<class T>() {
    for (op_kind op : ops) {
      for (std::size_t n : counts) {
        for (bool in_place : {false, true}) {
          ++seed;
          INFO(ringflow::dtype_name(ringflow::dtype_of<T>)
               << " " << ringflow::op_name(op) << " n=" << n << " in_place=" << in_place);
          const ringflow::chunk own = ringflow::partition(n, p, r);
          rc::device_buffer<T> in = to_device(input<T>(op, seed, r, n));
          rc::device_buffer<T> out(in_place ? 0 : own.count);
          std::span<T> result;
          with_op(op, [&](auto fn) {
            if (in_place) {
              result = c->reduce_scatter(in.span(), fn, s);
            } else {
              c->reduce_scatter<T>(std::span<const T>(in.span()), out.span(), fn, s);
              result = out.span();
            }
          });
          s.synchronize();
          REQUIRE(result.size() == own.count);
          if (in_place) CHECK(result.data() == in.data() + own.offset);
          CHECK(reduction_misses(to_host(result.data(), result.size()), op, seed, p, own.offset) ==
                0);
        }
      }
    }
  });
}

TEST_CASE("nccl allgather and broadcast move every dtype bit for bit", "[cuda][nccl]") {
  rc::nccl_communicator* c = nccl();
  if (c == nullptr) {
    SUCCEED("ranks share a GPU");
    return;
  }
  const int p = c->size(), r = c->rank();
  rc::stream s;
  std::uint64_t seed = 9000;
  for_each_type([&]<class T>() {
    for (std::size_t n : counts) {
      for (bool in_place : {false, true}) {
        ++seed;
        INFO(ringflow::dtype_name(ringflow::dtype_of<T>) << " n=" << n << " in_place=" << in_place);
        // allgather: piece q of the result comes from rank q.
        const ringflow::chunk own = ringflow::partition(n, p, r);
        std::vector<T> want(n);
        for (int q = 0; q < p; ++q) {
          const ringflow::chunk piece = ringflow::partition(n, p, q);
          const auto v = input<T>(op_kind::max, seed, q, piece.count, piece.offset);
          std::copy(v.begin(), v.end(), want.begin() + static_cast<std::ptrdiff_t>(piece.offset));
        }
        const auto mine = input<T>(op_kind::max, seed, r, own.count, own.offset);
        rc::device_buffer<T> out(n);
        if (in_place) {
          upload(out.data() + own.offset, mine.data(), own.count);
          c->allgather(out.span(), s);
        } else {
          rc::device_buffer<T> in = to_device(mine);
          c->allgather<T>(std::span<const T>(in.span()), out.span(), s);
          s.synchronize();
        }
        s.synchronize();
        const auto got = to_host(out.data(), n);
        CHECK(std::memcmp(got.data(), want.data(), n * sizeof(T)) == 0);

        // broadcast from the first and the last rank.
        for (int root : {0, p - 1}) {
          const auto sent = input<T>(op_kind::max, seed + 77, root, n);
          rc::device_buffer<T> buf = to_device(r == root ? sent : std::vector<T>(n));
          if (in_place) {
            c->broadcast(buf.span(), root, s);
            s.synchronize();
            CHECK(std::memcmp(to_host(buf.data(), n).data(), sent.data(), n * sizeof(T)) == 0);
          } else {
            rc::device_buffer<T> dst(n);
            c->broadcast<T>(r == root ? std::span<const T>(buf.span()) : std::span<const T>(),
                            dst.span(), root, s);
            s.synchronize();
            CHECK(std::memcmp(to_host(dst.data(), n).data(), sent.data(), n * sizeof(T)) == 0);
          }
        }
      }
    }
  });
}

TEST_CASE("nccl ring_allreduce and stream_ring_allreduce equal ringflow's CPU ring bit for bit",
          "[cuda][nccl]") {
  rc::nccl_communicator* c = nccl();
  if (c == nullptr) {
    SUCCEED("ranks share a GPU");
    return;
  }
  const int r = c->rank();
  rc::stream s;
  std::uint64_t seed = 13000;
  for_each_type([&]<class T>() {
    for (op_kind op : ops) {
      for (std::size_t n : counts) {
        for (bool in_place : {false, true}) {
          ++seed;
          INFO(ringflow::dtype_name(ringflow::dtype_of<T>)
               << " " << ringflow::op_name(op) << " n=" << n << " in_place=" << in_place);
          // Floats here are arbitrary (not the exact-by-construction inputs):
          // the order of the combination must match, not just the value.
          std::vector<T> mine(n);
          for (std::size_t i = 0; i < n; ++i) {
            mine[i] = is_float_v<T> && op != op_kind::prod
                          ? static_cast<T>(
                                static_cast<double>(pick(seed, r, i, -1000000, 1000000)) / 7777.0)
                          : value<T>(op, seed, r, i);
          }
          std::vector<T> cpu(n);
          rc::device_buffer<T> in = to_device(mine), in2 = to_device(mine);
          rc::device_buffer<T> out(in_place ? 0 : n), out2(in_place ? 0 : n);
          with_op(op, [&](auto fn) {
            ringflow::allreduce<T>(world(), std::span<const T>(mine), std::span<T>(cpu), fn,
                                   ringflow::coll_options{ringflow::algo::ring, 0});
            if (in_place) {
              // A small segment: many segments per chunk at the larger counts.
              c->ring_allreduce(in.span(), fn, s, 64 * 1024);
              c->stream_ring_allreduce(in2.span(), fn, s);
            } else {
              c->ring_allreduce<T>(std::span<const T>(in.span()), out.span(), fn, s);
              c->stream_ring_allreduce<T>(std::span<const T>(in2.span()), out2.span(), fn, s);
            }
          });
          s.synchronize();
          const auto got = to_host(in_place ? in.data() : out.data(), n);
          const auto got2 = to_host(in_place ? in2.data() : out2.data(), n);
          CHECK(std::memcmp(got.data(), cpu.data(), n * sizeof(T)) == 0);
          CHECK(std::memcmp(got2.data(), cpu.data(), n * sizeof(T)) == 0);
        }
      }
    }
  });
}

TEST_CASE("nccl collectives refuse host memory and wrong sizes before any traffic",
          "[cuda][nccl]") {
  rc::nccl_communicator* c = nccl();
  if (c == nullptr) {
    SUCCEED("ranks share a GPU");
    return;
  }
  const int p = c->size(), r = c->rank();
  rc::stream s;
  std::vector<float> host(64, 1.0f);
  rc::pinned_buffer<float> pinned(64);
  rc::device_buffer<float> dev(64);
  auto message_of = [](auto&& call) {
    try {
      call();
    } catch (const ringflow::usage_error& e) {
      return std::string(e.what());
    }
    return std::string("(no usage_error)");
  };
  std::string what = message_of([&] { c->allreduce(std::span<float>(host), ringflow::sum, s); });
  INFO(what);
  CHECK(what.find("not device memory") != std::string::npos);
  CHECK(what.find("rank " + std::to_string(r)) != std::string::npos);
  what = message_of([&] { c->allreduce(pinned.span(), ringflow::sum, s); });
  CHECK(what.find("pinned host memory") != std::string::npos);
  what = message_of([&] { c->ring_allreduce(std::span<float>(host), ringflow::max, s); });
  CHECK(what.find("not device memory") != std::string::npos);
  what = message_of([&] { c->stream_ring_allreduce(std::span<float>(host), ringflow::max, s); });
  CHECK(what.find("not device memory") != std::string::npos);
  what = message_of([&] { c->broadcast(std::span<float>(host), 0, s); });
  CHECK(what.find("not device memory") != std::string::npos);
  what = message_of([&] {
    c->allgather<float>(std::span<const float>(host.data(), ringflow::partition(64, p, r).count),
                        dev.span(), s);
  });
  CHECK(what.find("not device memory") != std::string::npos);
  // reduce_scatter's output must be this rank's piece (ringflow's contract).
  what = message_of([&] {
    rc::device_buffer<float> wrong(ringflow::partition(64, p, r).count + 1);
    c->reduce_scatter<float>(std::span<const float>(dev.span()), wrong.span(), ringflow::sum, s);
  });
  CHECK(what.find("see ringflow::partition") != std::string::npos);
  what = message_of([&] { c->broadcast(dev.span(), p, s); });
  CHECK(what.find("root") != std::string::npos);
  what = message_of([&] {
    c->allreduce<float>(std::span<const float>(dev.data(), 32),
                        std::span<float>(dev.data() + 16, 32), ringflow::sum, s);
  });
  CHECK(what.find("overlap") != std::string::npos);
  // The communicator still works afterwards (nothing half-started).
  c->allreduce(dev.span(), ringflow::sum, s);
  s.synchronize();
}

TEST_CASE("checked mode: mismatched NCCL calls throw usage_error on every rank", "[cuda][nccl]") {
  rc::nccl_communicator* c = nccl();
  if (c == nullptr) {
    SUCCEED("ranks share a GPU");
    return;
  }
  if (c->size() < 2) {
    SUCCEED("one rank: nothing to mismatch");
    return;
  }
  REQUIRE(c->base().checked());
  rc::stream s;
  rc::device_buffer<float> buf(static_cast<std::size_t>(100 + c->rank()));
  bool threw = false;
  try {
    c->allreduce(buf.span(), ringflow::sum, s);  // counts differ across ranks
  } catch (const ringflow::usage_error& e) {
    threw = true;
    INFO(e.what());
  }
  CHECK(threw);
  int all = threw ? 1 : 0;
  ringflow::allreduce(world(), std::span<int>(&all, 1), ringflow::min);
  CHECK(all == 1);
  // Still usable.
  rc::device_buffer<float> ok(10);
  c->allreduce(ok.span(), ringflow::sum, s);
  s.synchronize();
}

TEST_CASE("nccl_transport: a send-first exchange completes; requests test and wait",
          "[cuda][nccl]") {
  rc::nccl_communicator* c = nccl();
  if (c == nullptr) {
    SUCCEED("ranks share a GPU");
    return;
  }
  const int p = c->size(), r = c->rank();
  auto t = c->transport();
  REQUIRE(t);
  CHECK(t->name() == "nccl");
  CHECK(t->rank() == r);
  CHECK(t->size() == p);
  CHECK(t == c->transport());  // one transport per communicator while it lives
  const int right = (r + 1) % p, left = (r + p - 1) % p;
  for (std::size_t n : {std::size_t{1}, std::size_t{4099}, (std::size_t{1} << 22) + 5}) {
    INFO("n=" << n);
    std::vector<std::int32_t> mine(n);
    for (std::size_t i = 0; i < n; ++i)
      mine[i] = static_cast<std::int32_t>(i * 31 + static_cast<std::size_t>(r));
    rc::device_buffer<std::int32_t> send = to_device(mine), recv(n);
    // Every rank sends first (the pattern that deadlocks on NCCL p2p
    // launched one operation at a time), then receives, then waits.
    ringflow::request sr = t->isend(send.data(), n * sizeof(std::int32_t), right, 1);
    ringflow::request rr = t->irecv(recv.data(), n * sizeof(std::int32_t), left, 1);
    sr.wait();
    rr.wait();
    const auto got = to_host(recv.data(), n);
    std::size_t bad = 0;
    for (std::size_t i = 0; i < n; ++i) {
      bad += got[i] != static_cast<std::int32_t>(i * 31 + static_cast<std::size_t>(left));
    }
    CHECK(bad == 0);
  }
  // test() launches and eventually reports completion.
  rc::device_buffer<double> a(1000), b(1000);
  ringflow::request rr = t->irecv(b.data(), b.bytes(), left, 2);
  ringflow::request sr = t->isend(a.data(), a.bytes(), right, 2);
  while (!rr.test()) {}
  sr.wait();
  CHECK_FALSE(rr.pending());
  // Host memory and bad peers are refused.
  std::vector<char> host(8);
  CHECK_THROWS_AS(t->isend(host.data(), host.size(), right, 0), ringflow::usage_error);
  CHECK_THROWS_AS(t->irecv(b.data(), 8, p, 0), ringflow::usage_error);

  // split: ranks of one parity form a child transport over ncclCommSplit;
  // a negative colour takes no part.
  auto child = t->split(r % 2, r);
  REQUIRE(child);
  CHECK(child->size() == (p + 1 - r % 2) / 2);
  CHECK(child->rank() == r / 2);
  CHECK(t->split(-1, r) == nullptr);
  {
    const int cp = child->size(), cr = child->rank();
    rc::device_buffer<std::int64_t> x = to_device(std::vector<std::int64_t>(5, 100 + r)), y(5);
    ringflow::request cs = child->isend(x.data(), x.bytes(), (cr + 1) % cp, 4);
    ringflow::request cq = child->irecv(y.data(), y.bytes(), (cr + cp - 1) % cp, 4);
    cq.wait();
    cs.wait();
    const int from = ((cr + cp - 1) % cp) * 2 + r % 2;  // its rank in the parent
    CHECK(to_host(y.data(), 5) == std::vector<std::int64_t>(5, 100 + from));
  }
}

TEST_CASE("nccl_communicator moves, and a moved-from one is empty", "[cuda][nccl]") {
  if (gpus_shared()) {
    SUCCEED("ranks share a GPU");
    return;
  }
  rc::nccl_communicator a(world());
  const ncclComm_t raw = a.raw();
  rc::nccl_communicator b(std::move(a));
  CHECK(a.raw() == nullptr);
  CHECK(a.size() == 0);
  CHECK(b.raw() == raw);
  CHECK(b.rank() == world().rank());
  rc::stream s;
  rc::device_buffer<std::int32_t> x = to_device(std::vector<std::int32_t>(3, 2));
  b.allreduce(x.span(), ringflow::sum, s);
  s.synchronize();
  CHECK(to_host(x.data(), 3) == std::vector<std::int32_t>(3, 2 * world().size()));
  CHECK_THROWS_AS(a.allreduce(x.span(), ringflow::sum, s), ringflow::usage_error);
  rc::nccl_communicator c(world());
  c = std::move(b);  // c's own communicator is destroyed, b's taken over
  CHECK(c.raw() == raw);
  c.allreduce(x.span(), ringflow::sum, s);
  s.synchronize();
  CHECK(to_host(x.data(), 3) == std::vector<std::int32_t>(3, 2 * world().size() * world().size()));
}

// Hidden (run with "[timeout]"): leaves an unmatched NCCL receive on the GPU
// until ncclCommAbort, so it runs on its own communicator and only on request.
TEST_CASE("nccl_transport: an unmatched receive times out instead of hanging",
          "[cuda][nccl][.][timeout]") {
  if (gpus_shared()) {
    SUCCEED("ranks share a GPU");
    return;
  }
  rc::nccl_communicator own(world());
  auto t = own.transport();
  t->set_timeout(std::chrono::milliseconds(1500));
  rc::device_buffer<float> buf(16);
  // Every rank receives from its left neighbour, and nobody sends.
  const int from = (own.rank() + own.size() - 1) % own.size();
  ringflow::request rr = t->irecv(buf.data(), buf.bytes(), from, 3);
  std::string what;
  try {
    rr.wait();
  } catch (const ringflow::timeout_error& e) {
    what = e.what();
  }
  INFO(what);
  CHECK(what.find("did not complete") != std::string::npos);
  CHECK(what.find("receive of 64 bytes from rank " + std::to_string(from)) != std::string::npos);

  own.abort();
  t.reset();
  // The GPU is usable afterwards.
  RINGFLOW_CHECK_CUDA(cudaDeviceSynchronize());
}
// --- The rest of the collective set against the CPU collectives -------------

namespace {
/// Uneven counts with zeros: rank q's share of a collective of size n.
std::vector<std::size_t> uneven_counts(std::size_t n, int p, std::uint64_t seed) {
  std::vector<std::size_t> c(static_cast<std::size_t>(p));
  for (int q = 0; q < p; ++q) {
    c[static_cast<std::size_t>(q)] =
        n == 0 ? 0 : static_cast<std::size_t>(pick(seed, q, 0, 0, static_cast<long long>(n)));
  }
  if (p > 1) c[1 % static_cast<std::size_t>(p)] = 0;  // a rank with nothing
  return c;
}

template <class T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}
}  // namespace

TEST_CASE("nccl alltoall(v), gather(v), scatter(v) and allgatherv equal the CPU collectives",
          "[cuda][nccl]") {
  rc::nccl_communicator* c = nccl();
  if (c == nullptr) {
    SUCCEED("ranks share a GPU");
    return;
  }
  const int p = c->size(), r = c->rank();
  const auto P = static_cast<std::size_t>(p), R = static_cast<std::size_t>(r);
  auto& w = world();
  rc::stream s;
  std::uint64_t seed = 20000;
  for_each_type([&]<class T>() {
    for (std::size_t n : {std::size_t{0}, std::size_t{1}, std::size_t{7}, std::size_t{4099}}) {
      ++seed;
      INFO(ringflow::dtype_name(ringflow::dtype_of<T>) << " n=" << n);
      // alltoall: n elements per peer.
      {
        const auto host_in = input<T>(op_kind::max, seed, r, n * P);
        std::vector<T> want(n * P);
        ringflow::alltoall<T>(w, std::span<const T>(host_in), std::span<T>(want));
        rc::device_buffer<T> in = to_device(host_in), out(n * P);
        c->alltoall<T>(std::span<const T>(in.span()), out.span(), s);
        s.synchronize();
        CHECK(same_bits(to_host(out.data(), n * P), want));
      }
      // alltoallv: rank a sends (n + a + b) % 5 elements to rank b.
      {
        std::vector<std::size_t> sc(P), rcn(P);
        for (std::size_t q = 0; q < P; ++q) {
          sc[q] = (n + R + q) % 5;
          rcn[q] = (n + q + R) % 5;
        }
        const auto sd = ringflow::detail::packed_displs(sc),
                   rd = ringflow::detail::packed_displs(rcn);
        const std::size_t ns = sd.back() + sc.back(), nr = rd.back() + rcn.back();
        const auto host_in = input<T>(op_kind::max, seed + 1, r, ns);
        std::vector<T> want(nr);
        ringflow::alltoallv<T>(w, std::span<const T>(host_in), sc, sd, std::span<T>(want), rcn, rd);
        rc::device_buffer<T> in = to_device(host_in), out(nr);
        c->alltoallv<T>(std::span<const T>(in.span()), sc, sd, out.span(), rcn, rd, s);
        s.synchronize();
        CHECK(same_bits(to_host(out.data(), nr), want));
      }
      for (int root : {0, p - 1}) {
        const bool is_root = r == root;
        // gather and scatter: n elements per rank.
        {
          const auto mine = input<T>(op_kind::max, seed + 2, r, n);
          std::vector<T> want(is_root ? n * P : 0);
          ringflow::gather<T>(w, std::span<const T>(mine), std::span<T>(want), root);
          rc::device_buffer<T> in = to_device(mine), out(is_root ? n * P : 0);
          c->gather<T>(std::span<const T>(in.span()), out.span(), root, s);
          s.synchronize();
          if (is_root) CHECK(same_bits(to_host(out.data(), n * P), want));

          const auto all = is_root ? input<T>(op_kind::max, seed + 3, r, n * P) : std::vector<T>();
          std::vector<T> got_cpu(n);
          ringflow::scatter<T>(w, std::span<const T>(all), std::span<T>(got_cpu), root);
          rc::device_buffer<T> din = to_device(all), dout(n);
          c->scatter<T>(std::span<const T>(din.span()), dout.span(), root, s);
          s.synchronize();
          CHECK(same_bits(to_host(dout.data(), n), got_cpu));
        }
        // gatherv and scatterv with uneven counts (one rank sends nothing).
        {
          const auto counts = uneven_counts(n, p, seed + 4);
          const auto displs = ringflow::detail::packed_displs(counts);
          const std::size_t total = displs.back() + counts.back();
          const auto mine = input<T>(op_kind::max, seed + 5, r, counts[R]);
          std::vector<T> want(is_root ? total : 0);
          ringflow::gatherv<T>(w, std::span<const T>(mine), std::span<T>(want), counts, displs,
                               root);
          rc::device_buffer<T> in = to_device(mine), out(is_root ? total : 0);
          c->gatherv<T>(std::span<const T>(in.span()), out.span(), counts, displs, root, s);
          s.synchronize();
          if (is_root) CHECK(same_bits(to_host(out.data(), total), want));

          const auto all = is_root ? input<T>(op_kind::max, seed + 6, r, total) : std::vector<T>();
          std::vector<T> got_cpu(counts[R]);
          ringflow::scatterv<T>(w, std::span<const T>(all), counts, displs, std::span<T>(got_cpu),
                                root);
          rc::device_buffer<T> din = to_device(all), dout(counts[R]);
          c->scatterv<T>(std::span<const T>(din.span()), counts, displs, dout.span(), root, s);
          s.synchronize();
          CHECK(same_bits(to_host(dout.data(), counts[R]), got_cpu));
        }
      }
      // allgatherv, out of place and in place.
      {
        const auto counts = uneven_counts(n, p, seed + 7);
        const auto displs = ringflow::detail::packed_displs(counts);
        const std::size_t total = displs.back() + counts.back();
        const auto mine = input<T>(op_kind::max, seed + 8, r, counts[R]);
        std::vector<T> want(total);
        ringflow::allgatherv<T>(w, std::span<const T>(mine), std::span<T>(want), counts, displs);
        rc::device_buffer<T> in = to_device(mine), out(total);
        c->allgatherv<T>(std::span<const T>(in.span()), out.span(), counts, displs, s);
        s.synchronize();
        CHECK(same_bits(to_host(out.data(), total), want));
        rc::device_buffer<T> inplace(total);
        upload(inplace.data() + displs[R], mine.data(), counts[R]);
        c->allgatherv<T>(std::span<const T>(inplace.data() + displs[R], counts[R]), inplace.span(),
                         counts, displs, s);
        s.synchronize();
        CHECK(same_bits(to_host(inplace.data(), total), want));
      }
    }
  });
}

TEST_CASE("nccl reduce and reduce_scatter_v: ringflow's reduction for every op and dtype",
          "[cuda][nccl]") {
  rc::nccl_communicator* c = nccl();
  if (c == nullptr) {
    SUCCEED("ranks share a GPU");
    return;
  }
  const int p = c->size(), r = c->rank();
  const auto R = static_cast<std::size_t>(r);
  rc::stream s;
  std::uint64_t seed = 30000;
  for_each_type([&]<class T>() {
    for (op_kind op : ops) {
      for (std::size_t n : {std::size_t{0}, std::size_t{1}, std::size_t{7}, std::size_t{4099}}) {
        ++seed;
        INFO(ringflow::dtype_name(ringflow::dtype_of<T>)
             << " " << ringflow::op_name(op) << " n=" << n);
        for (int root : {0, p - 1}) {
          for (bool in_place : {false, true}) {
            rc::device_buffer<T> in = to_device(input<T>(op, seed, r, n));
            rc::device_buffer<T> out(in_place || r != root ? 0 : n);
            with_op(op, [&](auto fn) {
              if (in_place) {
                c->reduce(in.span(), fn, root, s);
              } else {
                c->reduce<T>(std::span<const T>(in.span()), out.span(), fn, root, s);
              }
            });
            s.synchronize();
            if (r == root) {
              CHECK(reduction_misses(to_host(in_place ? in.data() : out.data(), n), op, seed, p,
                                     0) == 0);
            }
          }
        }
        // reduce_scatter_v: uneven pieces, one empty.
        const auto counts = uneven_counts(n, p, seed + 1);
        const auto offsets = ringflow::detail::packed_displs(counts);
        const std::size_t total = offsets.back() + counts.back();
        rc::device_buffer<T> in = to_device(input<T>(op, seed, r, total));
        rc::device_buffer<T> out(counts[R]);
        with_op(op, [&](auto fn) {
          c->reduce_scatter_v<T>(std::span<const T>(in.span()), out.span(), counts, fn, s);
        });
        s.synchronize();
        CHECK(reduction_misses(to_host(out.data(), counts[R]), op, seed, p, offsets[R]) == 0);
      }
    }
  });
}

TEST_CASE("checked mode: NCCL gatherv and alltoallv with disagreeing counts throw on every rank",
          "[cuda][nccl]") {
  rc::nccl_communicator* c = nccl();
  if (c == nullptr) {
    SUCCEED("ranks share a GPU");
    return;
  }
  if (c->size() < 2) {
    SUCCEED("one rank: nothing to disagree about");
    return;
  }
  REQUIRE(c->base().checked());
  const int p = c->size(), r = c->rank();
  const auto P = static_cast<std::size_t>(p);
  rc::stream s;
  // The root expects one element more from rank 1 than rank 1 sends.
  std::vector<std::size_t> counts(P, 4);
  counts[1] = 5;
  const auto displs = ringflow::detail::packed_displs(counts);
  rc::device_buffer<float> in(4), out(r == 0 ? displs.back() + counts.back() : 0);
  std::string what;
  try {
    c->gatherv<float>(std::span<const float>(in.span()), out.span(), counts, displs, 0, s);
  } catch (const ringflow::usage_error& e) {
    what = e.what();
  }
  INFO(what);
  CHECK(what.find("disagree about the counts") != std::string::npos);
  if (r == 0)
    CHECK(what.find("rank 1 sends 4 elements to rank 0, which expects 5") != std::string::npos);
  // alltoallv: rank 0 sends 3 to everyone, everyone expects 2 from rank 0.
  std::vector<std::size_t> sc(P, 2), rcn(P, 2);
  if (r == 0) std::fill(sc.begin(), sc.end(), 3);
  if (r == 0) rcn[0] = 3;  // its own block agrees with itself
  const auto sd = ringflow::detail::packed_displs(sc), rd = ringflow::detail::packed_displs(rcn);
  rc::device_buffer<float> a(sd.back() + sc.back()), b(rd.back() + rcn.back());
  bool threw = false;
  try {
    c->alltoallv<float>(std::span<const float>(a.span()), sc, sd, b.span(), rcn, rd, s);
  } catch (const ringflow::usage_error&) {
    threw = true;
  }
  CHECK(threw);
  // Still usable.
  rc::device_buffer<float> ok(10);
  c->allreduce(ok.span(), ringflow::sum, s);
  s.synchronize();
}
#endif  // RINGFLOW_HAS_NCCL
