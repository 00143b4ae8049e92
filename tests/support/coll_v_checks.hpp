// Backend-independent checks of alltoall(v), gather(v), scatter(v), reduce,
// allgatherv and reduce_scatter_v against serial references. Like
// coll_checks.hpp they record failures instead of asserting (ranks may be
// threads).
#pragma once

#include <fmt/format.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <string>
#include <vector>

#include "ringflow/coll/collectives.hpp"
#include "ringflow/coll/sparse.hpp"
#include "support/bit_identity.hpp"
#include "support/coll_checks.hpp"

namespace ringflow::testing {

/// An exact small value for element j of the block rank `from` sends to
/// rank `to` (exact in int8 .. bfloat16; never the poison -1).
template <class T>
T block_value(int from, int to, std::size_t j) {
  return static_cast<T>(static_cast<int>(
      (static_cast<std::size_t>(from) * 31 + static_cast<std::size_t>(to) * 7 + j * 3) % 97));
}

/// Elements rank `from` sends rank `to` in the uneven tests: 0 for some
/// pairs, and every block of rank 1 empty when `seed` is odd (a rank with
/// nothing to send). `scale` makes large blocks.
inline std::size_t uneven_count(int from, int to, int seed, std::size_t scale) {
  if (seed % 2 == 1 && from == 1) return 0;
  const auto v = static_cast<std::size_t>((from * 3 + to * 5 + seed) % 7);
  return v == 3 ? 0 : v * scale + (v % 2);
}

template <class T>
bool check_block(const T* got, int from, int to, std::size_t n, const std::string& what,
                 failures& out) {
  for (std::size_t j = 0; j < n; ++j) {
    const T want = block_value<T>(from, to, j);
    if (!same_bits(got[j], want)) {
      out.push_back(fmt::format("{}: element {} of the block from rank {} to rank {} = {}, want {}",
                                what, j, from, to, show(got[j]), show(want)));
      return false;
    }
  }
  return true;
}

template <class T>
void check_alltoall(const communicator& c, std::size_t count, alltoall_options opt, failures& out) {
  const int p = c.size(), r = c.rank();
  const auto up = static_cast<std::size_t>(p);
  std::vector<T> in(up * count), res(up * count, static_cast<T>(-1));
  for (int q = 0; q < p; ++q) {
    for (std::size_t j = 0; j < count; ++j)
      in[static_cast<std::size_t>(q) * count + j] = block_value<T>(r, q, j);
  }
  alltoall<T>(c, std::span<const T>(in), std::span<T>(res), opt);
  const std::string what =
      fmt::format("rank {} of {}: alltoall<{}>(count={}, {})", r, p, dtype_name(dtype_of<T>), count,
                  alltoall_algo_name(opt.algorithm));
  for (int q = 0; q < p; ++q) {
    if (!check_block(res.data() + static_cast<std::size_t>(q) * count, q, r, count, what, out))
      return;
  }
}

/// Alltoallv with uneven counts, gaps between blocks (displacements are not
/// the prefix sums) and blocks in reverse order in the output.
template <class T>
void check_alltoallv(const communicator& c, int seed, std::size_t scale, failures& out) {
  const int p = c.size(), r = c.rank();
  const auto up = static_cast<std::size_t>(p);
  std::vector<std::size_t> sc(up), sd(up), rc(up), rd(up);
  std::size_t at = 0;
  for (int q = 0; q < p; ++q) {
    sc[q] = uneven_count(r, q, seed, scale);
    sd[q] = at + 1;  // one unused element before each block
    at += sc[q] + 1;
  }
  std::vector<T> in(at, static_cast<T>(-1));
  for (int q = 0; q < p; ++q) {
    for (std::size_t j = 0; j < sc[q]; ++j) in[sd[q] + j] = block_value<T>(r, q, j);
  }
  at = 0;
  for (int q = p - 1; q >= 0; --q) {
    rc[q] = uneven_count(q, r, seed, scale);
    rd[q] = at;
    at += rc[q] + 2;
  }
  std::vector<T> res(at, static_cast<T>(-1));
  alltoallv<T>(c, std::span<const T>(in), sc, sd, std::span<T>(res), rc, rd);
  const std::string what = fmt::format("rank {} of {}: alltoallv<{}>(seed={}, scale={})", r, p,
                                       dtype_name(dtype_of<T>), seed, scale);
  for (int q = 0; q < p; ++q) {
    if (!check_block(res.data() + rd[q], q, r, rc[q], what, out)) return;
    // The gap after each block is untouched.
    if (!same_bits(res[rd[q] + rc[q]], static_cast<T>(-1))) {
      out.push_back(fmt::format("{}: wrote past the block from rank {}", what, q));
      return;
    }
  }
}

/// gather and gatherv (uneven, rank `r` sends uneven_count(r, root)) to `root`.
template <class T>
void check_gather(const communicator& c, std::size_t count, int root, failures& out) {
  const int p = c.size(), r = c.rank();
  const auto up = static_cast<std::size_t>(p);
  std::vector<T> in(count);
  for (std::size_t j = 0; j < count; ++j) in[j] = block_value<T>(r, root, j);
  std::vector<T> res(r == root ? up * count : 0, static_cast<T>(-1));
  gather<T>(c, std::span<const T>(in), std::span<T>(res), root);
  const std::string what = fmt::format("rank {} of {}: gather<{}>(count={}, root={})", r, p,
                                       dtype_name(dtype_of<T>), count, root);
  if (r == root) {
    for (int q = 0; q < p; ++q) {
      if (!check_block(res.data() + static_cast<std::size_t>(q) * count, q, root, count, what, out))
        return;
    }
  }
}

template <class T>
void check_gatherv(const communicator& c, int seed, std::size_t scale, int root, bool in_place,
                   failures& out) {
  const int p = c.size(), r = c.rank();
  const auto up = static_cast<std::size_t>(p);
  std::vector<std::size_t> counts(up);
  for (int q = 0; q < p; ++q) counts[q] = uneven_count(q, root, seed, scale);
  const auto displs = detail::packed_displs(counts);
  const std::size_t total = std::accumulate(counts.begin(), counts.end(), std::size_t{0});
  std::vector<T> in(counts[r]);
  for (std::size_t j = 0; j < in.size(); ++j) in[j] = block_value<T>(r, root, j);
  std::vector<T> res(r == root ? total : 0, static_cast<T>(-1));
  if (r == root && in_place) {
    std::copy(in.begin(), in.end(), res.begin() + static_cast<std::ptrdiff_t>(displs[r]));
    gatherv<T>(c, std::span<const T>(res.data() + displs[r], counts[r]), std::span<T>(res), counts,
               displs, root);
  } else if (r == root) {
    gatherv<T>(c, std::span<const T>(in), std::span<T>(res), counts, root);
  } else {
    gatherv<T>(c, std::span<const T>(in), std::span<T>(), {}, {}, root);
  }
  const std::string what =
      fmt::format("rank {} of {}: gatherv<{}>(seed={}, root={}{})", r, p, dtype_name(dtype_of<T>),
                  seed, root, in_place ? ", in place" : "");
  if (r == root) {
    for (int q = 0; q < p; ++q) {
      if (!check_block(res.data() + displs[q], q, root, counts[q], what, out)) return;
    }
  }
}

template <class T>
void check_scatter(const communicator& c, std::size_t count, int root, failures& out) {
  const int p = c.size(), r = c.rank();
  const auto up = static_cast<std::size_t>(p);
  std::vector<T> in(r == root ? up * count : 0);
  if (r == root) {
    for (int q = 0; q < p; ++q) {
      for (std::size_t j = 0; j < count; ++j)
        in[static_cast<std::size_t>(q) * count + j] = block_value<T>(root, q, j);
    }
  }
  std::vector<T> res(count, static_cast<T>(-1));
  scatter<T>(c, std::span<const T>(in), std::span<T>(res), root);
  check_block(res.data(), root, r, count,
              fmt::format("rank {} of {}: scatter<{}>(count={}, root={})", r, p,
                          dtype_name(dtype_of<T>), count, root),
              out);
}

template <class T>
void check_scatterv(const communicator& c, int seed, std::size_t scale, int root, failures& out) {
  const int p = c.size(), r = c.rank();
  const auto up = static_cast<std::size_t>(p);
  std::vector<std::size_t> counts(up), displs(up);
  std::size_t at = 0;
  for (int q = p - 1; q >= 0; --q) {  // blocks in reverse order, with gaps
    counts[q] = uneven_count(root, q, seed, scale);
    displs[q] = at;
    at += counts[q] + 1;
  }
  std::vector<T> in(r == root ? at : 0, static_cast<T>(-1));
  if (r == root) {
    for (int q = 0; q < p; ++q) {
      for (std::size_t j = 0; j < counts[q]; ++j) in[displs[q] + j] = block_value<T>(root, q, j);
    }
  }
  std::vector<T> res(uneven_count(root, r, seed, scale), static_cast<T>(-1));
  if (r == root) {
    scatterv<T>(c, std::span<const T>(in), counts, displs, std::span<T>(res), root);
  } else {
    scatterv<T>(c, std::span<const T>(), {}, {}, std::span<T>(res), root);
  }
  check_block(res.data(), root, r, res.size(),
              fmt::format("rank {} of {}: scatterv<{}>(seed={}, root={})", r, p,
                          dtype_name(dtype_of<T>), seed, root),
              out);
}

template <class T, class Op>
void check_reduce(const communicator& c, std::size_t count, const Op& op, int root, bool in_place,
                  coll_options opt, failures& out) {
  const int p = c.size(), r = c.rank();
  std::vector<T> in(count);
  for (std::size_t i = 0; i < count; ++i) in[i] = static_cast<T>(input_value(r, i, Op::kind));
  const std::vector<T> saved = in;
  std::vector<T> res(r == root ? count : 0, static_cast<T>(-7));
  const T* got = res.data();
  if (in_place) {
    reduce(c, std::span<T>(in), op, root, opt);
    got = in.data();
  } else {
    reduce<T, Op>(c, std::span<const T>(in), std::span<T>(res), op, root, opt);
  }
  const std::string what = fmt::format("rank {} of {}: reduce<{}, {}>(count={}, root={}, {}{})", r,
                                       p, dtype_name(dtype_of<T>), op_name(Op::kind), count, root,
                                       algo_name(opt.algorithm), in_place ? ", in place" : "");
  if (r != root) {
    for (std::size_t i = 0; i < count; ++i) {
      if (!same_bits(in[i], saved[i])) {
        out.push_back(fmt::format("{}: a non-root's input changed at {}", what, i));
        return;
      }
    }
    return;
  }
  for (std::size_t i = 0; i < count; ++i) {
    const T want = reference_value<T>(p, i, op);
    if (!same_bits(got[i], want)) {
      out.push_back(fmt::format("{}: element {} = {}, want {}", what, i, show(got[i]), show(want)));
      return;
    }
  }
}

/// Uneven per-rank counts every rank agrees on (some 0).
inline std::vector<std::size_t> uneven_counts(int p, int seed, std::size_t scale) {
  std::vector<std::size_t> v(static_cast<std::size_t>(p));
  for (int q = 0; q < p; ++q) v[static_cast<std::size_t>(q)] = uneven_count(q, 0, seed, scale);
  return v;
}

template <class T>
void check_allgatherv(const communicator& c, int seed, std::size_t scale, bool in_place,
                      failures& out) {
  const int p = c.size(), r = c.rank();
  const auto counts = uneven_counts(p, seed, scale);
  // Blocks in reverse order with a gap after each: a layout of this rank's own.
  std::vector<std::size_t> displs(counts.size());
  std::size_t at = 0;
  for (int q = p - 1; q >= 0; --q) displs[q] = at, at += counts[q] + 1;
  std::vector<T> res(at, static_cast<T>(-1));
  std::vector<T> mine(counts[r]);
  for (std::size_t j = 0; j < mine.size(); ++j) mine[j] = block_value<T>(r, 0, j);
  if (in_place) {
    std::copy(mine.begin(), mine.end(), res.begin() + static_cast<std::ptrdiff_t>(displs[r]));
    allgatherv<T>(c, std::span<const T>(res.data() + displs[r], counts[r]), std::span<T>(res),
                  counts, displs);
  } else {
    allgatherv<T>(c, std::span<const T>(mine), std::span<T>(res), counts, displs);
  }
  const std::string what =
      fmt::format("rank {} of {}: allgatherv<{}>(seed={}, scale={}{})", r, p,
                  dtype_name(dtype_of<T>), seed, scale, in_place ? ", in place" : "");
  for (int q = 0; q < p; ++q) {
    if (!check_block(res.data() + displs[q], q, 0, counts[q], what, out)) return;
    if (!same_bits(res[displs[q] + counts[q]], static_cast<T>(-1))) {
      out.push_back(fmt::format("{}: wrote past the block of rank {}", what, q));
      return;
    }
  }
}

template <class T, class Op>
void check_reduce_scatter_v(const communicator& c, int seed, std::size_t scale, const Op& op,
                            bool in_place, failures& out) {
  const int p = c.size(), r = c.rank();
  const auto counts = uneven_counts(p, seed, scale);
  const auto offsets = detail::packed_displs(counts);
  const std::size_t total = std::accumulate(counts.begin(), counts.end(), std::size_t{0});
  std::vector<T> in(total);
  for (std::size_t i = 0; i < total; ++i) in[i] = static_cast<T>(input_value(r, i, Op::kind));
  std::vector<T> res(counts[r], static_cast<T>(-7));
  const T* got = res.data();
  if (in_place) {
    reduce_scatter_v<T>(c, std::span<const T>(in), std::span<T>(in.data() + offsets[r], counts[r]),
                        counts, op);
    got = in.data() + offsets[r];
  } else {
    reduce_scatter_v<T>(c, std::span<const T>(in), std::span<T>(res), counts, op);
  }
  for (std::size_t j = 0; j < counts[r]; ++j) {
    const T want = reference_value<T>(p, offsets[r] + j, op);
    if (!same_bits(got[j], want)) {
      out.push_back(fmt::format(
          "rank {} of {}: reduce_scatter_v<{}, {}>(seed={}, scale={}{}) element {} = {}, want {}",
          r, p, dtype_name(dtype_of<T>), op_name(Op::kind), seed, scale,
          in_place ? ", in place" : "", j, show(got[j]), show(want)));
      return;
    }
  }
}

/// The counts the uniform collectives are checked at for p ranks: 0, 1,
/// p-1, p+1, primes and a large one.
inline std::vector<std::size_t> v_counts(int p) {
  return {0,
          1,
          static_cast<std::size_t>(p > 1 ? p - 1 : 2),
          static_cast<std::size_t>(p + 1),
          7,
          13,
          1009,
          65537};
}

/// Every new collective for one dtype (reductions with sum and max, plus
/// avg and prod at one size).
template <class T>
void check_v_suite(const communicator& c, failures& out) {
  const int p = c.size();
  for (std::size_t count : v_counts(p)) {
    for (alltoall_algo a :
         {alltoall_algo::pairwise, alltoall_algo::bruck, alltoall_algo::automatic}) {
      if (count < 65537 || a != alltoall_algo::bruck || p <= 4)
        check_alltoall<T>(c, count, alltoall_options{a}, out);
    }
    const int root = static_cast<int>(count % static_cast<std::size_t>(p));
    check_gather<T>(c, count, root, out);
    check_scatter<T>(c, count, root, out);
    for (algo a : {algo::tree, algo::ring, algo::automatic}) {
      check_reduce<T>(c, count, sum, root, false, coll_options{a, 0}, out);
      check_reduce<T>(c, count, max, p - 1 - root, true, coll_options{a, 64}, out);
    }
  }
  check_reduce<T>(c, 1009, avg, 0, false, coll_options{algo::tree, 0}, out);
  check_reduce<T>(c, 1009, prod, 0, false, coll_options{algo::ring, 0}, out);
  for (int seed = 0; seed < 4; ++seed) {
    const std::size_t scale = seed == 3 ? 4099 : static_cast<std::size_t>(seed + 1);
    check_alltoallv<T>(c, seed, scale, out);
    check_gatherv<T>(c, seed, scale, seed % p, seed % 2 == 0, out);
    check_scatterv<T>(c, seed, scale, (seed + 1) % p, out);
    check_allgatherv<T>(c, seed, scale, seed % 2 == 1, out);
    check_reduce_scatter_v<T>(c, seed, scale, sum, seed % 2 == 0, out);
    check_reduce_scatter_v<T>(c, seed, scale, max, seed % 2 == 1, out);
  }
  check_reduce_scatter_v<T>(c, 2, 3, avg, false, out);
  check_reduce_scatter_v<T>(c, 1, 3, prod, true, out);
}

/// Reduce of awkward inputs (NaNs, Inf, -0, denormals; bit_identity.hpp):
/// the root's result satisfies the order-free facts, every rank gets the
/// same bytes from the root, and a second call gives the same bytes.
template <class T, class Op>
void check_reduce_identity(const communicator& c, algo a, std::size_t count, const Op& op, int root,
                           failures& out) {
  const int r = c.rank();
  const std::string what =
      fmt::format("reduce<{}, {}>(algo::{}, count={}, root={})", dtype_name(dtype_of<T>),
                  op_name(Op::kind), algo_name(a), count, root);
  std::vector<T> in(count), res(count), again(count);
  for (std::size_t i = 0; i < count; ++i) in[i] = awkward_value<T>(r, i);
  reduce<T, Op>(c, std::span<const T>(in), std::span<T>(res), op, root, coll_options{a, 0});
  reduce<T, Op>(c, std::span<const T>(in), std::span<T>(again), op, root, coll_options{a, 0});
  if (r == root) {
    check_values<T, Op>(c, res, 0, what, out);
    if (count && std::memcmp(res.data(), again.data(), count * sizeof(T)) != 0) {
      out.push_back(fmt::format("rank {}: {}: a second reduce gave other bits", r, what));
    }
  }
  broadcast(c, std::span<T>(res), root);
  compare_with_rank0(c, res, what, out);
}

/// reduce_scatter_v of awkward inputs, then allgatherv: the same bytes on
/// every rank, the order-free facts, and a second call the same bits.
template <class T, class Op>
void check_reduce_scatter_v_identity(const communicator& c, int seed, std::size_t scale,
                                     const Op& op, failures& out) {
  const int p = c.size(), r = c.rank();
  const auto counts = uneven_counts(p, seed, scale);
  const auto offsets = detail::packed_displs(counts);
  const std::size_t total = std::accumulate(counts.begin(), counts.end(), std::size_t{0});
  const std::string what = fmt::format("reduce_scatter_v + allgatherv<{}, {}>(seed={})",
                                       dtype_name(dtype_of<T>), op_name(Op::kind), seed);
  std::vector<T> in(total), piece(counts[r]), again(counts[r]), all(total);
  for (std::size_t i = 0; i < total; ++i) in[i] = awkward_value<T>(r, i);
  reduce_scatter_v<T>(c, std::span<const T>(in), std::span<T>(piece), counts, op);
  check_values<T, Op>(c, piece, offsets[r], what, out);
  allgatherv<T>(c, std::span<const T>(piece), std::span<T>(all), counts);
  compare_with_rank0(c, all, what, out);
  reduce_scatter_v<T>(c, std::span<const T>(in), std::span<T>(again), counts, op);
  if (!piece.empty() && std::memcmp(piece.data(), again.data(), piece.size() * sizeof(T)) != 0) {
    out.push_back(fmt::format("rank {}: {}: a second reduce_scatter_v gave other bits", r, what));
  }
}

template <class T>
void check_v_identity_all_ops(const communicator& c, failures& out) {
  const int p = c.size();
  for (algo a : {algo::tree, algo::ring}) {
    check_reduce_identity<T>(c, a, 4099, sum, 0, out);
    check_reduce_identity<T>(c, a, 4099, prod, p - 1, out);
    check_reduce_identity<T>(c, a, 4099, min, p / 2, out);
    check_reduce_identity<T>(c, a, 4099, max, 0, out);
    check_reduce_identity<T>(c, a, 4099, avg, p - 1, out);
  }
  check_reduce_scatter_v_identity<T>(c, 1, 301, sum, out);
  check_reduce_scatter_v_identity<T>(c, 2, 301, prod, out);
  check_reduce_scatter_v_identity<T>(c, 3, 301, min, out);
  check_reduce_scatter_v_identity<T>(c, 0, 301, max, out);
  check_reduce_scatter_v_identity<T>(c, 1, 301, avg, out);
}

}  // namespace ringflow::testing

namespace ringflow::testing {

/// Rank r's sparse rows: a few indices out of 0..40 (repeats within a rank,
/// none at all on rank 1 when `seed` is odd), `width` elements each.
inline std::vector<std::int64_t> sparse_indices(int rank, int seed) {
  if (seed % 2 == 1 && rank == 1) return {};
  std::vector<std::int64_t> v;
  const int n = 3 + (rank * 5 + seed) % 6;
  for (int k = 0; k < n; ++k) v.push_back((rank * 13 + k * 7 + seed * 3) % 41);
  if (n > 3) v.push_back(v.front());  // a repeat
  return v;
}

/// sparse_allreduce of sparse_indices' rows against a serial sum; with
/// `opt` (the indices lie in [0, 41)) on the dense path too: the rows are
/// small integers, so every order of summation gives the same bits.
template <class T>
void check_sparse_allreduce(const communicator& c, int seed, std::size_t width, failures& out,
                            sparse_allreduce_options opt = {}) {
  const int p = c.size(), r = c.rank();
  auto row_value = [&](int rank, std::size_t k, std::size_t j) {
    return static_cast<T>(static_cast<int>((static_cast<std::size_t>(rank) * 3 + k * 5 + j) % 7));
  };
  const auto idx = sparse_indices(r, seed);
  std::vector<T> rows(idx.size() * width);
  for (std::size_t k = 0; k < idx.size(); ++k) {
    for (std::size_t j = 0; j < width; ++j) rows[k * width + j] = row_value(r, k, j);
  }
  const auto got = sparse_allreduce<T>(c, idx, std::span<const T>(rows), width, opt);
  // Serial reference: every rank's rows in (rank, position) order.
  std::vector<std::int64_t> want_idx;
  std::vector<double> want;
  for (int q = 0; q < p; ++q) {
    const auto qi = sparse_indices(q, seed);
    for (std::size_t k = 0; k < qi.size(); ++k) {
      auto it = std::lower_bound(want_idx.begin(), want_idx.end(), qi[k]);
      const auto at = static_cast<std::size_t>(it - want_idx.begin());
      if (it == want_idx.end() || *it != qi[k]) {
        want_idx.insert(it, qi[k]);
        want.insert(want.begin() + static_cast<std::ptrdiff_t>(at * width), width, 0.0);
      }
      for (std::size_t j = 0; j < width; ++j) {
        want[at * width + j] += static_cast<double>(static_cast<float>(row_value(q, k, j)));
      }
    }
  }
  const std::string what = fmt::format(
      "rank {} of {}: sparse_allreduce<{}>(seed={}, width={}, table_rows={}, {})", r, p,
      dtype_name(dtype_of<T>), seed, width, opt.table_rows, got.dense ? "dense" : "sparse");
  const bool want_dense =
      opt.reduction == sparse_reduction::dense ||
      (opt.reduction == sparse_reduction::automatic &&
       sparse_allreduce_prefers_dense(got.rank_rows, width, sizeof(T), opt.table_rows));
  if (got.dense != want_dense) {
    out.push_back(fmt::format("{}: took the other path", what));
    return;
  }
  if (got.indices != want_idx || got.values.size() != want.size() || got.width != width) {
    out.push_back(
        fmt::format("{}: {} indices, want {}", what, got.indices.size(), want_idx.size()));
    return;
  }
  for (std::size_t i = 0; i < want.size(); ++i) {
    if (!same_bits(got.values[i], static_cast<T>(static_cast<float>(want[i])))) {
      out.push_back(
          fmt::format("{}: value {} = {}, want {}", what, i, show(got.values[i]), want[i]));
      return;
    }
  }
  compare_with_rank0(c, got.values, what, out);
}

}  // namespace ringflow::testing
