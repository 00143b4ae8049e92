// Bit identity with awkward floating inputs: NaNs with different payloads and
// signs on different ranks, +-Inf, -0, denormals. Every rank must hold the
// same bytes after every allreduce algorithm (and after reduce_scatter +
// allgather), whatever the backend; shared by the thread and MPI tests.
#pragma once

#include <fmt/format.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <vector>

#include "ringflow/coll/collectives.hpp"
#include "support/coll_checks.hpp"

namespace ringflow::testing {

/// Bit layout of a floating element type.
template <class T>
struct float_layout;
template <>
struct float_layout<float> {
  static constexpr int width = 32, mantissa = 23;
};
template <>
struct float_layout<double> {
  static constexpr int width = 64, mantissa = 52;
};
template <>
struct float_layout<half> {
  static constexpr int width = 16, mantissa = 10;
};
template <>
struct float_layout<bfloat16> {
  static constexpr int width = 16, mantissa = 7;
};

template <class T>
T from_bits(std::uint64_t b) {
  if constexpr (sizeof(T) == 2) {
    return T::from_bits(static_cast<std::uint16_t>(b));
  } else if constexpr (sizeof(T) == 4) {
    return std::bit_cast<T>(static_cast<std::uint32_t>(b));
  } else {
    return std::bit_cast<T>(b);
  }
}

template <class T>
std::uint64_t to_bits(T v) {
  if constexpr (sizeof(T) == 2) {
    return v.bits;
  } else if constexpr (sizeof(T) == 4) {
    return std::bit_cast<std::uint32_t>(v);
  } else {
    return std::bit_cast<std::uint64_t>(v);
  }
}

inline std::uint64_t mix(std::uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

/// Element i of rank `rank`'s input. Every fourth element is "clean" on all
/// ranks (zeros, denormals and ordinary values only), so some results are
/// finite; elsewhere about a quarter of the inputs are NaNs (quiet and
/// signalling) whose payload and sign depend on rank and index, so two NaNs
/// with different payloads meet in most combines.
template <class T>
T awkward_value(int rank, std::size_t i) {
  using L = float_layout<T>;
  const std::uint64_t h = mix((static_cast<std::uint64_t>(rank) << 40) ^ i);
  const std::uint64_t sign = (h >> 7 & 1) << (L::width - 1);
  const std::uint64_t exp_all = ((std::uint64_t{1} << (L::width - 1 - L::mantissa)) - 1)
                                << L::mantissa;
  const std::uint64_t mant_mask = (std::uint64_t{1} << L::mantissa) - 1;
  const std::uint64_t quiet = std::uint64_t{1} << (L::mantissa - 1);
  const std::uint64_t payload = (h >> 11) & (quiet - 1);
  const bool clean = i % 4 == 0;
  switch (h % 20) {
    case 0:
    case 1:
    case 2:
    case 3:
      if (!clean) return from_bits<T>(sign | exp_all | quiet | payload);  // quiet NaN
      break;
    case 4:
      if (!clean) return from_bits<T>(sign | exp_all | (payload | 1));  // signalling NaN
      break;
    case 5:
    case 6:
      if (!clean) return from_bits<T>(sign | exp_all);  // +-Inf
      break;
    case 7:
    case 8: return from_bits<T>(sign);  // +-0
    case 9:
    case 10: return from_bits<T>(sign | ((h >> 13) & mant_mask) | 1);  // denormal
    default: break;
  }
  const float v = 1.0f + static_cast<float>((h >> 20) % 64) / 37.0f;
  return static_cast<T>(h >> 8 & 1 ? -v : v);
}

template <class T>
std::string hex_bits(T v) {
  return fmt::format("{:#0{}x}", to_bits(v), 2 + 2 * static_cast<int>(sizeof(T)));
}

/// Compares `mine` with rank 0's bytes (broadcast as bytes, so nothing but a
/// copy touches them); records the first differing element.
template <class T>
void compare_with_rank0(const communicator& c, const std::vector<T>& mine, const std::string& what,
                        failures& out) {
  std::vector<std::uint8_t> ref(mine.size() * sizeof(T));
  if (!ref.empty()) std::memcpy(ref.data(), mine.data(), ref.size());
  broadcast(c, std::span<std::uint8_t>(ref), 0);
  for (std::size_t i = 0; i < mine.size(); ++i) {
    T theirs;
    std::memcpy(static_cast<void*>(&theirs), ref.data() + i * sizeof(T), sizeof(T));
    if (!same_bits(mine[i], theirs)) {
      out.push_back(fmt::format("rank {} of {}: {}: element {} is {}, rank 0 has {}", c.rank(),
                                c.size(), what, i, hex_bits(mine[i]), hex_bits(theirs)));
      return;
    }
  }
}

/// What every result must satisfy whatever the reduction order: a NaN input
/// makes a NaN result; min/max are the exact extreme otherwise; sum/avg of a
/// clean element (no NaN or Inf on any rank) is finite and close to the
/// exact sum.
template <class T, class Op>
void check_values(const communicator& c, const std::vector<T>& res, std::size_t base,
                  const std::string& what, failures& out) {
  const int p = c.size();
  for (std::size_t k = 0; k < res.size(); ++k) {
    const std::size_t i = base + k;
    bool any_nan = false;
    double lo = INFINITY, hi = -INFINITY, sum = 0;
    for (int r = 0; r < p; ++r) {
      const T v = awkward_value<T>(r, i);
      const double d =
          sizeof(T) == 8 ? static_cast<double>(v) : static_cast<double>(static_cast<float>(v));
      if (std::isnan(d)) {
        any_nan = true;
        continue;
      }
      lo = std::min(lo, d), hi = std::max(hi, d), sum += d;
    }
    const double got = sizeof(T) == 8 ? static_cast<double>(res[k])
                                      : static_cast<double>(static_cast<float>(res[k]));
    std::string wrong;
    if (any_nan && !std::isnan(got)) {
      wrong = "a NaN input gave a non-NaN result";
    } else if (!any_nan && Op::kind == op_kind::min && got != lo) {
      wrong = fmt::format("want min {}", lo);
    } else if (!any_nan && Op::kind == op_kind::max && got != hi) {
      wrong = fmt::format("want max {}", hi);
    } else if (i % 4 == 0 && (Op::kind == op_kind::sum || Op::kind == op_kind::avg)) {
      const double want = Op::kind == op_kind::avg ? sum / p : sum;
      const double tol = (sizeof(T) == 2 ? 2e-2 : 1e-5) * (1 + std::abs(want)) * p;
      if (!(std::abs(got - want) <= tol)) wrong = fmt::format("want about {}", want);
    }
    if (!wrong.empty()) {
      out.push_back(fmt::format("rank {} of {}: {}: element {} = {} ({}): {}", c.rank(), p, what, i,
                                got, hex_bits(res[k]), wrong));
      return;
    }
  }
}

/// Allreduce of awkward inputs through `a`: every rank the same bytes, a
/// second call the same bytes again, and the order-free facts of
/// check_values. Ranks differ on purpose in how they call: odd ranks run in
/// place, even ranks out of place, and each rank's buffer starts at a
/// different alignment.
template <class T, class Op>
void check_bit_identity(const communicator& c, algo a, std::size_t count, const Op& op,
                        failures& out) {
  const int r = c.rank();
  const std::string what =
      fmt::format("allreduce<{}, {}>(algo::{}, count={})", dtype_name(dtype_of<T>),
                  op_name(Op::kind), algo_name(a), count);
  const std::size_t shift = static_cast<std::size_t>(r % 4);
  std::vector<T> in(count + shift), res(count + shift);
  for (std::size_t i = 0; i < count; ++i) in[shift + i] = awkward_value<T>(r, i);
  const std::span<T> in_s(in.data() + shift, count), res_s(res.data() + shift, count);
  std::vector<T> first(count), second(count);
  // While first-use tuning measures this size, automatic's calls try
  // different algorithms, whose bits may differ (docs/collectives.md,
  // "First-use tuning"); every rank still holds the same bits.
  const bool trying = a == algo::automatic && c.size() > 1 && count > 0 &&
                      detail::automatic_calls_left(c, count * sizeof(T)) != 0;
  for (std::vector<T>* dst : {&first, &second}) {
    std::vector<T> saved(in_s.begin(), in_s.end());
    if (r % 2) {
      allreduce(c, in_s, op, coll_options{a, 0});
      dst->assign(in_s.begin(), in_s.end());
      std::copy(saved.begin(), saved.end(), in_s.begin());
    } else {
      allreduce(c, std::span<const T>(in_s), res_s, op, coll_options{a, 0});
      dst->assign(res_s.begin(), res_s.end());
    }
  }
  if (count && !trying && std::memcmp(first.data(), second.data(), count * sizeof(T)) != 0) {
    out.push_back(fmt::format("rank {}: {}: a second identical call gave other bits", r, what));
  }
  compare_with_rank0(c, first, what, out);
  check_values<T, Op>(c, first, 0, what, out);
  // Recursive doubling's documented rule (docs/collectives.md, "Bit
  // identity"): every NaN its combines make for sum, prod, avg is canonical.
  if (a == algo::recursive_doubling && c.size() > 1 && detail::nan_order_sensitive<T, Op>) {
    for (std::size_t i = 0; i < count; ++i) {
      if (detail::is_nan_bits(first[i]) && !same_bits(first[i], detail::canonical_nan<T>())) {
        out.push_back(fmt::format("rank {}: {}: element {} is the NaN {}, not the canonical {}", r,
                                  what, i, hex_bits(first[i]),
                                  hex_bits(detail::canonical_nan<T>())));
        break;
      }
    }
  }
}

/// reduce_scatter then allgather of awkward inputs with algorithm `a`
/// (allgather with recursive doubling for halving_doubling): every rank the
/// same bytes, the order-free facts of check_values for each piece, and a
/// second reduce_scatter the same piece bits. (Not: the allreduce's bytes.
/// Which NaN payload survives depends on the compiled loop, so different
/// calls may differ there; only redundant combines must not.)
template <class T, class Op>
void check_scatter_gather_identity(const communicator& c, algo a, std::size_t count, const Op& op,
                                   failures& out) {
  const int p = c.size(), r = c.rank();
  const std::string what =
      fmt::format("reduce_scatter + allgather<{}, {}>(algo::{}, count={})", dtype_name(dtype_of<T>),
                  op_name(Op::kind), algo_name(a), count);
  std::vector<T> in(count);
  for (std::size_t i = 0; i < count; ++i) in[i] = awkward_value<T>(r, i);
  const chunk own = partition(count, p, r);
  std::vector<T> piece(own.count), all(count);
  reduce_scatter(c, std::span<const T>(in), std::span<T>(piece), op, coll_options{a, 0});
  check_values<T, Op>(c, piece, own.offset, what, out);
  const algo gather = a == algo::halving_doubling ? algo::recursive_doubling : a;
  allgather(c, std::span<const T>(piece), std::span<T>(all), coll_options{gather, 0});
  compare_with_rank0(c, all, what, out);
  std::vector<T> again(own.count);
  reduce_scatter(c, std::span<const T>(in), std::span<T>(again), op, coll_options{a, 0});
  if (own.count && std::memcmp(piece.data(), again.data(), own.count * sizeof(T)) != 0) {
    out.push_back(fmt::format("rank {}: {}: a second reduce_scatter gave other bits", r, what));
  }
}

template <class T>
void check_bit_identity_all_ops(const communicator& c, algo a, std::size_t count, failures& out) {
  check_bit_identity<T>(c, a, count, sum, out);
  check_bit_identity<T>(c, a, count, prod, out);
  check_bit_identity<T>(c, a, count, min, out);
  check_bit_identity<T>(c, a, count, max, out);
  check_bit_identity<T>(c, a, count, avg, out);
}

template <class T>
void check_scatter_gather_all_ops(const communicator& c, algo a, std::size_t count, failures& out) {
  check_scatter_gather_identity<T>(c, a, count, sum, out);
  check_scatter_gather_identity<T>(c, a, count, prod, out);
  check_scatter_gather_identity<T>(c, a, count, min, out);
  check_scatter_gather_identity<T>(c, a, count, max, out);
  check_scatter_gather_identity<T>(c, a, count, avg, out);
}

/// The allreduce algorithms every backend runs (shm is the MPI test's).
inline constexpr algo identity_algorithms[] = {
    algo::ring,        algo::recursive_doubling, algo::halving_doubling, algo::tree,
    algo::double_tree, algo::hierarchical,       algo::automatic};

/// Every algorithm of `algos` x float, double, half, bfloat16 x every op, at
/// a small count (where automatic picks recursive doubling) and the counts
/// of the report (4013 floats, 8191 doubles; the 16-bit types at one count
/// each); then reduce_scatter + allgather.
template <class Algos>
void check_bit_identity_everything(const communicator& c, const Algos& algos, failures& out) {
  for (algo a : algos) {
    for (std::size_t n : {std::size_t{61}, std::size_t{4013}}) {
      check_bit_identity_all_ops<float>(c, a, n, out);
    }
    check_bit_identity_all_ops<half>(c, a, 61, out);
    check_bit_identity_all_ops<bfloat16>(c, a, 611, out);
    for (std::size_t n : {std::size_t{61}, std::size_t{8191}}) {
      check_bit_identity_all_ops<double>(c, a, n, out);
    }
  }
  for (algo a : {algo::automatic, algo::ring, algo::halving_doubling}) {
    check_scatter_gather_all_ops<float>(c, a, 4013, out);
    check_scatter_gather_all_ops<double>(c, a, 8191, out);
    check_scatter_gather_all_ops<half>(c, a, 611, out);
  }
}

}  // namespace ringflow::testing
