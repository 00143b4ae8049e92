// PowerSGD: rank-r approximation of each matrix of a gradient bucket (one per
// 2-D parameter tensor, or the whole bucket without a layout) by one
// warm-started power iteration per step, with Eigen for the products and QR.
#include <fmt/format.h>

#include <Eigen/Dense>
#include <algorithm>
#include <cmath>
#include <cstring>

#include "ringflow/coll/collectives.hpp"
#include "ringflow/compress/compressor.hpp"
#include "ringflow/compress/kernels.hpp"
#include "ringflow/core/error.hpp"

namespace ringflow::compress {

namespace {
using row_matrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using col_matrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic>;
using row_map = Eigen::Map<const row_matrix>;
using col_map = Eigen::Map<col_matrix>;
using const_col_map = Eigen::Map<const col_matrix>;

// PyTorch's PowerSGD hook compresses a matrix only if the rank-r factors take
// less than 1/min_compression_rate of it; smaller ones cost more than they save.
constexpr std::size_t min_compression_rate = 2;

Eigen::Index idx(std::size_t v) { return static_cast<Eigen::Index>(v); }

// Orthonormal basis of the columns of P (rows >= cols). Householder QR is
// stable where Gram-Schmidt loses orthogonality, and handles a rank-deficient
// (even zero) P without dividing by zero.
col_matrix orthogonalized(const col_matrix& p) {
  Eigen::HouseholderQR<col_matrix> qr(p);
  return qr.householderQ() * col_matrix::Identity(p.rows(), p.cols());
}

// The elements of one matrix as a row-major rows x cols matrix: a view of the
// bucket when the matrix covers it exactly, else a zero-padded copy (whose
// heap buffer a move keeps in place, so the pointer stays valid).
class matrix_of {
 public:
  matrix_of(std::span<const float> bucket, const powersgd_compressor::matrix& m)
      : first_(bucket.data() + m.offset), rows_(idx(m.rows)), cols_(idx(m.cols)) {
    if (m.size != m.rows * m.cols) {
      padded_ = row_matrix::Zero(rows_, cols_);
      std::memcpy(padded_.data(), first_, m.size * sizeof(float));
      first_ = padded_.data();
    }
  }
  matrix_of(const matrix_of&) = delete;
  matrix_of(matrix_of&&) = default;
  row_map operator*() const { return row_map(first_, rows_, cols_); }

 private:
  row_matrix padded_;
  const float* first_;
  Eigen::Index rows_, cols_;
};

// out[0, size) = (or +=) the first `size` elements (row-major) of P Q^T.
template <class P, class Q>
void write_product(const P& p, const Q& q, float* out, std::size_t size, bool add) {
  const row_matrix m = p * q.transpose();
  const float* v = m.data();
  if (add) {
    for (std::size_t i = 0; i < size; ++i) out[i] += v[i];
  } else {
    std::memcpy(out, v, size * sizeof(float));
  }
}
}  // namespace

powersgd_compressor::powersgd_compressor(int rank, std::uint64_t seed) : rank_(rank), seed_(seed) {
  if (rank < 1) {
    throw usage_error(
        fmt::format("powersgd compressor: rank must be >= 1, got {} (e.g. powersgd:4)", rank));
  }
}

std::string powersgd_compressor::name() const { return fmt::format("powersgd:{}", rank_); }

powersgd_compressor::shape powersgd_compressor::shape_of(std::size_t n) const {
  if (n == 0) return {};
  auto rows = static_cast<std::size_t>(std::ceil(std::sqrt(static_cast<double>(n))));
  while (rows * rows < n) ++rows;  // guard the float sqrt
  const std::size_t cols = (n + rows - 1) / rows;
  return {rows, cols, std::min({static_cast<std::size_t>(rank_), rows, cols})};
}

powersgd_compressor::plan powersgd_compressor::plan_of(std::size_t n) const {
  plan pl;
  const auto r = static_cast<std::size_t>(rank_);
  if (!layout_) {
    const shape s = shape_of(n);
    if (n > 0) pl.matrices.push_back({0, n, s.rows, s.cols, s.rank});
  } else {
    if (n != layout_->size) {
      throw usage_error(fmt::format(
          "{}: the bucket has {} elements but its layout describes {}; set the layout of each "
          "bucket on its own compressor (bucket_compression does)",
          name(), n, layout_->size));
    }
    for (const tensor_shape& t : layout_->tensors) {
      // rows, cols >= 2 follows: r (1 + c) * 2 < c never holds.
      if ((t.rows + t.cols) * r * min_compression_rate < t.rows * t.cols) {
        pl.matrices.push_back({t.offset, t.size(), t.rows, t.cols, std::min({r, t.rows, t.cols})});
      }
    }
    std::sort(pl.matrices.begin(), pl.matrices.end(),
              [](const matrix& a, const matrix& b) { return a.offset < b.offset; });
  }
  // Everything between the matrices travels as it is.
  std::size_t at = 0;
  for (const matrix& m : pl.matrices) {
    if (m.offset > at) pl.raw.push_back({at, m.offset - at});
    at = m.offset + m.size;
    pl.p_floats += m.rows * m.rank;
    pl.q_floats += m.cols * m.rank;
  }
  if (n > at) pl.raw.push_back({at, n - at});
  for (const span_range& g : pl.raw) pl.raw_floats += g.size;
  return pl;
}

std::size_t powersgd_compressor::payload_bytes(std::size_t n) const {
  const plan pl = plan_of(n);
  return 4 * (pl.p_floats + pl.raw_floats + pl.q_floats);
}

std::vector<wire_round> powersgd_compressor::wire_plan(std::size_t n, int) const {
  const plan pl = plan_of(n);
  std::vector<wire_round> rounds{wire_round{combine::sum, 4 * (pl.p_floats + pl.raw_floats), 4}};
  if (pl.q_floats > 0) rounds.push_back(wire_round{combine::sum, 4 * pl.q_floats, 4});
  return rounds;
}

void powersgd_compressor::load_state(const compressor_state& s) {
  if (s.counter != 0) {
    throw usage_error(
        fmt::format("{}: load_state got a call counter of {}, but PowerSGD keeps "
                    "only warm starts (saved by int8 or top-k?)",
                    name(), s.counter));
  }
  if (layout_) {
    // A Q of another size would be silently drawn afresh by warm_q: refuse it.
    const std::size_t want = plan_of(layout_->size).q_floats;
    for (const auto& [id, q] : s.warm_start) {
      if (q.size() != want) {
        throw usage_error(fmt::format(
            "{}: the warm start of bucket {} has {} values, but this bucket's matrices need {} "
            "(another model, bucket cap or rank?)",
            name(), id, q.size(), want));
      }
    }
  }
  warm_ = s.warm_start;
}

std::vector<float>& powersgd_compressor::warm_q(std::uint64_t bucket_id, const plan& pl) {
  std::vector<float>& q = warm_[bucket_id];
  if (q.size() != pl.q_floats) {
    // Same seed and bucket on every rank, so every rank starts from the same
    // Q. Each matrix draws the same stream from its start, so a layer starts
    // alike inside a bucket and alone (which the tests rely on).
    q.resize(pl.q_floats);
    const std::uint64_t key = kernels::stream_key(seed_, bucket_id, 0x9a5d);
    std::size_t at = 0;
    for (const matrix& m : pl.matrices) {
      for (std::size_t i = 0; i < m.cols * m.rank; ++i)
        q[at + i] = kernels::uniform01(key, i) - 0.5f;
      at += m.cols * m.rank;
    }
  }
  return q;
}

void powersgd_compressor::encode(std::span<const float> in, std::span<std::byte> out,
                                 std::uint64_t bucket_id) {
  const std::size_t n = in.size();
  if (n == 0)
    throw usage_error(name() +
                      " encode: the tensor is empty; compression needs at least one element");
  const plan pl = plan_of(n);
  if (out.size() != payload_bytes(n)) {
    throw usage_error(fmt::format("{} encode: payload has {} bytes, but {} elements need {}",
                                  name(), out.size(), n, payload_bytes(n)));
  }
  // The one-rank form of reduce(): P = M Q, orthogonalize, Q = M^T P.
  // Payload: [P's | raw | Q's], the layout of reduce()'s two allreduces.
  std::vector<float>& warm = warm_q(bucket_id, pl);
  auto* p_out = reinterpret_cast<float*>(out.data());
  float* raw_out = p_out + pl.p_floats;
  float* q_out = raw_out + pl.raw_floats;
  std::size_t pa = 0, qa = 0;
  for (const matrix& mt : pl.matrices) {
    const matrix_of m(in, mt);
    const auto r = idx(mt.rank);
    const col_matrix p = orthogonalized(*m * const_col_map(warm.data() + qa, idx(mt.cols), r));
    const col_matrix q = (*m).transpose() * p;
    std::memcpy(p_out + pa, p.data(), mt.rows * mt.rank * sizeof(float));
    std::memcpy(q_out + qa, q.data(), mt.cols * mt.rank * sizeof(float));
    pa += mt.rows * mt.rank;
    qa += mt.cols * mt.rank;
  }
  for (const span_range& g : pl.raw) {
    std::memcpy(raw_out, in.data() + g.offset, g.size * sizeof(float));
    raw_out += g.size;
  }
  if (pl.q_floats > 0) std::memcpy(warm.data(), q_out, pl.q_floats * sizeof(float));
}

void powersgd_compressor::decode_add(std::span<const std::byte> payload,
                                     std::span<float> out) const {
  const std::size_t n = out.size();
  const plan pl = plan_of(n);
  if (payload.size() != payload_bytes(n)) {
    throw usage_error(fmt::format("{} decode: payload has {} bytes, but {} elements need {}",
                                  name(), payload.size(), n, payload_bytes(n)));
  }
  // The payload bytes need not be float-aligned: copy the factors out.
  std::vector<float> v(payload.size() / sizeof(float));
  std::memcpy(v.data(), payload.data(), payload.size());
  const float* p_in = v.data();
  const float* raw_in = p_in + pl.p_floats;
  const float* q_in = raw_in + pl.raw_floats;
  for (const matrix& mt : pl.matrices) {
    const auto r = idx(mt.rank);
    write_product(Eigen::Map<const col_matrix>(p_in, idx(mt.rows), r),
                  Eigen::Map<const col_matrix>(q_in, idx(mt.cols), r), out.data() + mt.offset,
                  mt.size, true);
    p_in += mt.rows * mt.rank;
    q_in += mt.cols * mt.rank;
  }
  for (const span_range& g : pl.raw) {
    for (std::size_t i = 0; i < g.size; ++i) out[g.offset + i] += raw_in[i];
    raw_in += g.size;
  }
}

void powersgd_compressor::reduce(const communicator& comm, std::span<float> data,
                                 std::span<float> mine, std::uint64_t bucket_id, traffic& stats) {
  const std::size_t n = data.size();
  if (n == 0)
    throw usage_error(name() +
                      " reduce: the tensor is empty; compression needs at least one element");
  if (!mine.empty() && mine.size() != n) {
    throw usage_error(
        fmt::format("{} reduce: `mine` has {} elements, data {}", name(), mine.size(), n));
  }
  const plan pl = plan_of(n);
  std::vector<float>& warm = warm_q(bucket_id, pl);
  // First allreduce: every P = M Q, then the uncompressed elements.
  std::vector<float> first(pl.p_floats + pl.raw_floats);
  std::vector<matrix_of> ms;
  ms.reserve(pl.matrices.size());
  std::size_t pa = 0, qa = 0;
  for (const matrix& mt : pl.matrices) {
    ms.emplace_back(data, mt);
    const auto r = idx(mt.rank);
    col_map(first.data() + pa, idx(mt.rows), r).noalias() =
        *ms.back() * const_col_map(warm.data() + qa, idx(mt.cols), r);
    pa += mt.rows * mt.rank;
    qa += mt.cols * mt.rank;
  }
  float* raw = first.data() + pl.p_floats;
  for (const span_range& g : pl.raw) {
    std::memcpy(raw, data.data() + g.offset, g.size * sizeof(float));
    raw += g.size;
  }
  allreduce(comm, std::span<float>(first), sum, algo::ring);

  // Every rank holds the same P bits, so every rank computes the same bases.
  std::vector<float> second(pl.q_floats);
  pa = qa = 0;
  for (std::size_t k = 0; k < pl.matrices.size(); ++k) {
    const matrix& mt = pl.matrices[k];
    const auto r = idx(mt.rank);
    col_map p(first.data() + pa, idx(mt.rows), r);
    p = orthogonalized(p);
    col_map q(second.data() + qa, idx(mt.cols), r);
    q.noalias() = (*ms[k]).transpose() * p;
    // This rank's share of the result: P (M_r^T P)^T, linear in M_r, so the
    // shares sum to P (sum_r Q_r)^T exactly (up to float rounding).
    if (!mine.empty()) write_product(p, q, mine.data() + mt.offset, mt.size, false);
    pa += mt.rows * mt.rank;
    qa += mt.cols * mt.rank;
  }
  if (!mine.empty()) {
    for (const span_range& g : pl.raw) {
      std::memcpy(mine.data() + g.offset, data.data() + g.offset, g.size * sizeof(float));
    }
  }
  if (pl.q_floats > 0) allreduce(comm, std::span<float>(second), sum, algo::ring);

  // The matrices view `data`: overwrite it only now that every Q is computed.
  ms.clear();
  pa = qa = 0;
  for (const matrix& mt : pl.matrices) {
    const auto r = idx(mt.rank);
    write_product(const_col_map(first.data() + pa, idx(mt.rows), r),
                  const_col_map(second.data() + qa, idx(mt.cols), r), data.data() + mt.offset,
                  mt.size, false);
    pa += mt.rows * mt.rank;
    qa += mt.cols * mt.rank;
  }
  raw = first.data() + pl.p_floats;
  for (const span_range& g : pl.raw) {
    std::memcpy(data.data() + g.offset, raw, g.size * sizeof(float));
    raw += g.size;
  }
  // A bucket without compressed matrices has no Q (both vectors empty, their
  // data() possibly null: memcpy's arguments must not be, even for 0 bytes).
  if (pl.q_floats > 0) std::memcpy(warm.data(), second.data(), pl.q_floats * sizeof(float));
  account(n, comm, stats);
}

}  // namespace ringflow::compress
