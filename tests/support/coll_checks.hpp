// Backend-independent correctness checks for the collectives. They return
// failure descriptions instead of asserting, because Catch2 assertions are
// not thread-safe and the local backend runs ranks as threads.
#pragma once

#include <fmt/format.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "ringflow/coll/algorithms.hpp"
#include "ringflow/coll/collectives.hpp"

namespace ringflow::testing {

using failures = std::vector<std::string>;

/// Small integer inputs: exact in every dtype, so any reduction order gives
/// the same exact answer and a serial reference can be compared bit for bit.
inline int input_value(int rank, std::size_t i, op_kind op) {
  if (op == op_kind::prod)
    return 1 + static_cast<int>((static_cast<std::size_t>(rank) * 3 + i) % 5 == 0);  // 1 or 2
  return 1 + static_cast<int>((static_cast<std::size_t>(rank) * 7 + i * 3) % 5);     // 1..5
}

template <class T, class Op>
T reference_value(int nranks, std::size_t i, const Op& op) {
  T acc = static_cast<T>(input_value(0, i, Op::kind));
  for (int r = 1; r < nranks; ++r) acc = op(acc, static_cast<T>(input_value(r, i, Op::kind)));
  return finish(op, acc, nranks);
}

template <class T>
bool same_bits(const T& a, const T& b) {
  return std::memcmp(&a, &b, sizeof(T)) == 0;
}

template <class T>
std::string show(T v) {
  if constexpr (std::is_same_v<T, half> || std::is_same_v<T, bfloat16>) {
    return fmt::format("{}", static_cast<float>(v));
  } else if constexpr (sizeof(T) == 1) {
    return fmt::format("{}", static_cast<int>(v));
  } else {
    return fmt::format("{}", v);
  }
}

/// Allreduce of `count` elements, in place or not, against the serial reference.
template <class T, class Op>
void check_allreduce(const communicator& c, std::size_t count, const Op& op, bool in_place,
                     coll_options opt, failures& out) {
  const int p = c.size(), r = c.rank();
  std::vector<T> in(count), res(count, static_cast<T>(-7));
  for (std::size_t i = 0; i < count; ++i) in[i] = static_cast<T>(input_value(r, i, Op::kind));
  if (in_place) {
    allreduce(c, std::span<T>(in), op, opt);
    res = in;
  } else {
    const std::vector<T> saved = in;
    allreduce(c, std::span<const T>(in), std::span<T>(res), op, opt);
    if (in != saved) {
      // compare bitwise: the input of an out-of-place call must be untouched
      for (std::size_t i = 0; i < count; ++i) {
        if (!same_bits(in[i], saved[i])) {
          out.push_back(fmt::format("rank {}: out-of-place allreduce modified input[{}]", r, i));
          break;
        }
      }
    }
  }
  for (std::size_t i = 0; i < count; ++i) {
    const T want = reference_value<T>(p, i, op);
    if (!same_bits(res[i], want)) {
      out.push_back(fmt::format(
          "rank {} of {}: allreduce<{}, {}>(count={}, {}, seg={}) element {} = {}, want {}", r, p,
          dtype_name(dtype_of<T>), op_name(Op::kind), count, in_place ? "in-place" : "out-of-place",
          opt.segment_bytes, i, show(res[i]), show(want)));
      return;
    }
  }
}

template <class T, class Op>
void check_reduce_scatter(const communicator& c, std::size_t count, const Op& op, bool in_place,
                          coll_options opt, failures& out) {
  const int p = c.size(), r = c.rank();
  const chunk own = partition(count, p, r);
  std::vector<T> in(count), res(own.count);
  for (std::size_t i = 0; i < count; ++i) in[i] = static_cast<T>(input_value(r, i, Op::kind));
  T* got = res.data();
  if (in_place) {
    reduce_scatter(c, std::span<const T>(in), std::span<T>(in.data() + own.offset, own.count), op,
                   opt);
    got = in.data() + own.offset;
  } else {
    reduce_scatter(c, std::span<const T>(in), std::span<T>(res), op, opt);
  }
  for (std::size_t i = 0; i < own.count; ++i) {
    const T want = reference_value<T>(p, own.offset + i, op);
    if (!same_bits(got[i], want)) {
      out.push_back(fmt::format(
          "rank {} of {}: reduce_scatter<{}, {}>(count={}) element {} = {}, want {}", r, p,
          dtype_name(dtype_of<T>), op_name(Op::kind), count, i, show(got[i]), show(want)));
      return;
    }
  }
}

template <class T>
void check_allgather(const communicator& c, std::size_t count, bool in_place, coll_options opt,
                     failures& out) {
  const int p = c.size(), r = c.rank();
  const chunk own = partition(count, p, r);
  auto value = [](std::size_t i) { return static_cast<T>(static_cast<int>(i % 97)); };
  std::vector<T> res(count, static_cast<T>(-1));
  if (in_place) {
    for (std::size_t i = 0; i < own.count; ++i) res[own.offset + i] = value(own.offset + i);
    allgather(c, std::span<const T>(res.data() + own.offset, own.count), std::span<T>(res), opt);
  } else {
    std::vector<T> mine(own.count);
    for (std::size_t i = 0; i < own.count; ++i) mine[i] = value(own.offset + i);
    allgather(c, std::span<const T>(mine), std::span<T>(res), opt);
  }
  for (std::size_t i = 0; i < count; ++i) {
    if (!same_bits(res[i], value(i))) {
      out.push_back(fmt::format("rank {} of {}: allgather<{}>(count={}) element {} = {}, want {}",
                                r, p, dtype_name(dtype_of<T>), count, i, show(res[i]),
                                show(value(i))));
      return;
    }
  }
}

template <class T>
void check_broadcast(const communicator& c, std::size_t count, int root, coll_options opt,
                     failures& out) {
  const int r = c.rank();
  auto value = [&](std::size_t i) {
    return static_cast<T>(static_cast<int>((i + static_cast<std::size_t>(root)) % 89));
  };
  std::vector<T> buf(count, static_cast<T>(-1));
  if (r == root) {
    for (std::size_t i = 0; i < count; ++i) buf[i] = value(i);
  }
  broadcast(c, std::span<T>(buf), root, opt);
  for (std::size_t i = 0; i < count; ++i) {
    if (!same_bits(buf[i], value(i))) {
      out.push_back(
          fmt::format("rank {}: broadcast<{}>(count={}, root={}) element {} = {}, want {}", r,
                      dtype_name(dtype_of<T>), count, root, i, show(buf[i]), show(value(i))));
      return;
    }
  }
}

/// The counts every collective must handle for p ranks.
inline std::vector<std::size_t> interesting_counts(int p) {
  std::vector<std::size_t> v{0, 1, 2, 7, 1000, 4099};
  v.push_back(static_cast<std::size_t>(p > 1 ? p - 1 : 1));
  v.push_back(static_cast<std::size_t>(p + 1));
  v.push_back(static_cast<std::size_t>(3 * p + 2));
  return v;
}

template <class T, class Op>
void check_allreduce_suite(const communicator& c, const Op& op, failures& out) {
  for (std::size_t count : interesting_counts(c.size())) {
    // Tiny segments exercise the pipelining; the default exercises the common path.
    for (std::size_t seg : {std::size_t{0}, std::size_t{24}}) {
      check_allreduce<T>(c, count, op, false, coll_options{algo::ring, seg}, out);
      check_allreduce<T>(c, count, op, true, coll_options{algo::ring, seg}, out);
    }
    check_reduce_scatter<T>(c, count, op, false, coll_options{algo::ring, 40}, out);
    check_reduce_scatter<T>(c, count, op, true, coll_options{algo::ring, 0}, out);
  }
}

template <class T>
void check_all_ops(const communicator& c, failures& out) {
  check_allreduce_suite<T>(c, sum, out);
  check_allreduce_suite<T>(c, prod, out);
  check_allreduce_suite<T>(c, min, out);
  check_allreduce_suite<T>(c, max, out);
  check_allreduce_suite<T>(c, avg, out);
  for (std::size_t count : interesting_counts(c.size())) {
    check_allgather<T>(c, count, false, coll_options{algo::ring, 16}, out);
    check_allgather<T>(c, count, true, coll_options{}, out);
  }
}

/// Every dtype x op x count, in place and out of place.
inline void check_every_dtype(const communicator& c, failures& out) {
  check_all_ops<float>(c, out);
  check_all_ops<double>(c, out);
  check_all_ops<std::int8_t>(c, out);
  check_all_ops<std::uint8_t>(c, out);
  check_all_ops<std::int32_t>(c, out);
  check_all_ops<std::int64_t>(c, out);
  check_all_ops<half>(c, out);
  check_all_ops<bfloat16>(c, out);
}

inline void check_broadcasts(const communicator& c, failures& out) {
  for (int root = 0; root < c.size(); ++root) {
    for (std::size_t count :
         {std::size_t{0}, std::size_t{1}, std::size_t{1000}, std::size_t{100000}}) {
      check_broadcast<float>(c, count, root, coll_options{}, out);
      check_broadcast<std::int8_t>(c, count, root, coll_options{algo::ring, 4096}, out);
    }
  }
}

/// A large float sum with non-exact values: every rank must hold the same
/// bits, and a second run must reproduce them.
inline void check_large_bitwise(const communicator& c, std::size_t count, failures& out) {
  std::vector<float> a(count), b(count);
  for (std::size_t i = 0; i < count; ++i) {
    a[i] = std::sin(static_cast<float>(i) * 0.37f + static_cast<float>(c.rank()) * 1.3f) * 1e3f;
  }
  b = a;
  // algo::automatic's first calls of a size try several algorithms
  // (first-use tuning), which may round differently; once it has settled,
  // identical calls give identical bits. (The loop's end is the same on
  // every rank: a pure function of the calls made.)
  std::vector<float> warm(count, 0.0f);
  for (int i = 0; i < 1000 && count > 0 && c.size() > 1 &&
                  detail::automatic_calls_left(c, count * sizeof(float)) != 0;
       ++i) {
    allreduce(c, std::span<float>(warm), sum);
  }
  allreduce(c, std::span<float>(a), sum);
  allreduce(c, std::span<float>(b), sum);
  if (std::memcmp(a.data(), b.data(), count * sizeof(float)) != 0) {
    out.push_back(fmt::format("rank {}: two identical allreduces gave different bits", c.rank()));
  }
  // Compare against rank 0's bits: broadcast rank 0's result and compare.
  std::vector<float> ref = a;
  broadcast(c, std::span<float>(ref), 0);
  if (std::memcmp(a.data(), ref.data(), count * sizeof(float)) != 0) {
    out.push_back(fmt::format("rank {}: result bits differ from rank 0's", c.rank()));
  }
  // And it is the right sum (to float rounding).
  for (std::size_t i = 0; i < count; i += 9973) {
    double want = 0;
    for (int r = 0; r < c.size(); ++r) {
      want += static_cast<double>(
          std::sin(static_cast<float>(i) * 0.37f + static_cast<float>(r) * 1.3f) * 1e3f);
    }
    if (std::abs(a[i] - want) > 1e-3 * c.size()) {
      out.push_back(
          fmt::format("rank {}: element {} = {}, want about {}", c.rank(), i, a[i], want));
      return;
    }
  }
}

/// The allreduce algorithms other than ring and native, each written against
/// the transport and so testable on every backend.
inline std::vector<algo> transport_algorithms() {
  // Every built-in row of the algorithm table but the ring (tested on its
  // own everywhere), so an algorithm added to the table is tested here too;
  // and automatic.
  std::vector<algo> v;
  for (const algorithm_info& info : allreduce_algorithms()) {
    if (info.run != nullptr && info.id != algo::ring) v.push_back(info.id);
  }
  v.push_back(algo::automatic);
  return v;
}

/// A segment size that splits the interesting counts into many segments
/// without making thousands of messages (0 is the algorithm's default).
inline std::size_t small_segment(algo a) {
  return a == algo::tree || a == algo::double_tree || a == algo::hierarchical ? 256 : 0;
}

template <class T, class Op>
void check_algorithm_op(const communicator& c, algo a, const Op& op, failures& out) {
  for (std::size_t count : interesting_counts(c.size())) {
    check_allreduce<T>(c, count, op, false, coll_options{a, 0}, out);
    check_allreduce<T>(c, count, op, true, coll_options{a, small_segment(a)}, out);
  }
}

template <class T>
void check_algorithm_all_ops_one_count(const communicator& c, algo a, std::size_t count,
                                       failures& out) {
  check_allreduce<T>(c, count, sum, false, coll_options{a, 0}, out);
  check_allreduce<T>(c, count, prod, true, coll_options{a, 0}, out);
  check_allreduce<T>(c, count, min, false, coll_options{a, 0}, out);
  check_allreduce<T>(c, count, max, true, coll_options{a, 0}, out);
  check_allreduce<T>(c, count, avg, false, coll_options{a, 0}, out);
}

/// One algorithm, sampled: float, int32 and half x sum, avg, max at every
/// interesting count (in and out of place), plus every dtype x op at one
/// count (the full matrix is run for the ring).
inline void check_algorithm(const communicator& c, algo a, failures& out) {
  check_algorithm_op<float>(c, a, sum, out);
  check_algorithm_op<float>(c, a, avg, out);
  check_algorithm_op<float>(c, a, max, out);
  check_algorithm_op<std::int32_t>(c, a, sum, out);
  check_algorithm_op<std::int32_t>(c, a, avg, out);
  check_algorithm_op<std::int32_t>(c, a, max, out);
  check_algorithm_op<half>(c, a, sum, out);
  check_algorithm_op<half>(c, a, avg, out);
  check_algorithm_op<half>(c, a, max, out);
  const std::size_t one = static_cast<std::size_t>(3 * c.size() + 2);
  check_algorithm_all_ops_one_count<float>(c, a, one, out);
  check_algorithm_all_ops_one_count<double>(c, a, one, out);
  check_algorithm_all_ops_one_count<std::int8_t>(c, a, one, out);
  check_algorithm_all_ops_one_count<std::uint8_t>(c, a, one, out);
  check_algorithm_all_ops_one_count<std::int32_t>(c, a, one, out);
  check_algorithm_all_ops_one_count<std::int64_t>(c, a, one, out);
  check_algorithm_all_ops_one_count<half>(c, a, one, out);
  check_algorithm_all_ops_one_count<bfloat16>(c, a, one, out);
}

/// A large float sum with non-exact values through algorithm `a`: identical
/// bits on every rank and on a second run, and close to the exact sum.
inline void check_large_bitwise_algo(const communicator& c, algo a, std::size_t count,
                                     failures& out) {
  std::vector<float> a1(count), a2(count);
  for (std::size_t i = 0; i < count; ++i) {
    a1[i] = std::sin(static_cast<float>(i) * 0.37f + static_cast<float>(c.rank()) * 1.3f) * 1e3f;
  }
  a2 = a1;
  std::vector<float> res(count);
  allreduce(c, std::span<const float>(a1), std::span<float>(res), sum, coll_options{a, 0});
  allreduce(c, std::span<float>(a2), sum, coll_options{a, 0});
  if (std::memcmp(res.data(), a2.data(), count * sizeof(float)) != 0) {
    out.push_back(fmt::format("rank {}: {}: two identical allreduces gave different bits", c.rank(),
                              algo_name(a)));
  }
  std::vector<float> ref = res;
  broadcast(c, std::span<float>(ref), 0);
  if (std::memcmp(res.data(), ref.data(), count * sizeof(float)) != 0) {
    out.push_back(
        fmt::format("rank {}: {}: result bits differ from rank 0's", c.rank(), algo_name(a)));
  }
  for (std::size_t i = 0; i < count; i += 9973) {
    double want = 0;
    for (int r = 0; r < c.size(); ++r) {
      want += static_cast<double>(
          std::sin(static_cast<float>(i) * 0.37f + static_cast<float>(r) * 1.3f) * 1e3f);
    }
    if (std::abs(res[i] - want) > 1e-3 * c.size()) {
      out.push_back(fmt::format("rank {}: {}: element {} = {}, want about {}", c.rank(),
                                algo_name(a), i, res[i], want));
      return;
    }
  }
}

/// min/max are not commutative bit for bit (min(+0, -0) keeps the first; a
/// NaN keeps its payload): every rank must still get the same bits.
inline void check_signed_zero_agreement(const communicator& c, algo a, failures& out) {
  const std::size_t count = 64;
  std::vector<float> v(count);
  for (std::size_t i = 0; i < count; ++i) {
    v[i] = ((static_cast<std::size_t>(c.rank()) + i) % 2) ? -0.0f : 0.0f;
  }
  allreduce(c, std::span<float>(v), min, coll_options{a, 0});
  std::vector<float> ref = v;
  broadcast(c, std::span<float>(ref), 0);
  if (std::memcmp(v.data(), ref.data(), count * sizeof(float)) != 0) {
    out.push_back(fmt::format("rank {}: {}: min of signed zeros differs from rank 0's bits",
                              c.rank(), algo_name(a)));
  }
}

}  // namespace ringflow::testing
