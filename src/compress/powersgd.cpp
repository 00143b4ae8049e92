// PowerSGD: rank-r approximation of a gradient bucket by one warm-started
// power iteration per step, with Eigen for the products and the QR.
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

// Orthonormal basis of the columns of P (rows >= cols). Householder QR is
// stable where Gram-Schmidt loses orthogonality, and handles a rank-deficient
// (even zero) P without dividing by zero.
void orthogonalize(col_matrix& p) {
  Eigen::HouseholderQR<col_matrix> qr(p);
  p = qr.householderQ() * col_matrix::Identity(p.rows(), p.cols());
}

// The bucket as a rows x cols row-major matrix, zero padded at the end.
row_matrix as_matrix(std::span<const float> x, std::size_t rows, std::size_t cols) {
  row_matrix m = row_matrix::Zero(static_cast<Eigen::Index>(rows), static_cast<Eigen::Index>(cols));
  std::memcpy(m.data(), x.data(), x.size_bytes());
  return m;
}

// First n elements (row-major) of P Q^T added to out.
void add_product(const col_matrix& p, const col_matrix& q, std::span<float> out) {
  const row_matrix m = p * q.transpose();
  const float* v = m.data();
  for (std::size_t i = 0; i < out.size(); ++i) out[i] += v[i];
}

void set_product(const col_matrix& p, const col_matrix& q, std::span<float> out) {
  const row_matrix m = p * q.transpose();
  std::memcpy(out.data(), m.data(), out.size_bytes());
}
}  // namespace

powersgd_compressor::powersgd_compressor(int rank, std::uint64_t seed) : rank_(rank), seed_(seed) {
  if (rank < 1) {
    throw usage_error(fmt::format(
        "powersgd compressor: rank must be >= 1, got {} (e.g. powersgd:4)", rank));
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

std::size_t powersgd_compressor::payload_bytes(std::size_t n) const {
  const shape s = shape_of(n);
  return 4 * s.rank * (s.rows + s.cols);
}

std::vector<wire_round> powersgd_compressor::wire_plan(std::size_t n, int) const {
  const shape s = shape_of(n);
  return {wire_round{combine::sum, 4 * s.rank * s.rows, 4},
          wire_round{combine::sum, 4 * s.rank * s.cols, 4}};
}

std::vector<float>& powersgd_compressor::warm_q(std::uint64_t bucket_id, const shape& s) {
  std::vector<float>& q = warm_[bucket_id];
  if (q.size() != s.cols * s.rank) {
    // Same seed and bucket on every rank, so every rank starts from the same Q.
    q.resize(s.cols * s.rank);
    const std::uint64_t key = kernels::stream_key(seed_, bucket_id, 0x9a5d);
    for (std::size_t i = 0; i < q.size(); ++i) q[i] = kernels::uniform01(key, i) - 0.5f;
  }
  return q;
}

void powersgd_compressor::encode(std::span<const float> in, std::span<std::byte> out,
                                 std::uint64_t bucket_id) {
  const std::size_t n = in.size();
  if (n == 0) throw usage_error("powersgd:" + std::to_string(rank_) + " encode: the tensor is empty; compression needs at least one element");
  if (out.size() != payload_bytes(n)) {
    throw usage_error(fmt::format("{} encode: payload has {} bytes, but {} elements need {}", name(),
                                  out.size(), n, payload_bytes(n)));
  }
  // The one-rank form of reduce(): P = M Q, orthogonalize, Q = M^T P.
  const shape s = shape_of(n);
  const auto r = static_cast<Eigen::Index>(s.rank);
  const row_matrix m = as_matrix(in, s.rows, s.cols);
  std::vector<float>& warm = warm_q(bucket_id, s);
  col_matrix q = Eigen::Map<col_matrix>(warm.data(), static_cast<Eigen::Index>(s.cols), r);
  col_matrix p = m * q;
  orthogonalize(p);
  q = m.transpose() * p;
  std::memcpy(warm.data(), q.data(), warm.size() * sizeof(float));
  std::memcpy(out.data(), p.data(), 4 * s.rows * s.rank);
  std::memcpy(out.data() + 4 * s.rows * s.rank, q.data(), 4 * s.cols * s.rank);
}

void powersgd_compressor::decode_add(std::span<const std::byte> payload, std::span<float> out) const {
  const std::size_t n = out.size();
  if (payload.size() != payload_bytes(n)) {
    throw usage_error(fmt::format("{} decode: payload has {} bytes, but {} elements need {}", name(),
                                  payload.size(), n, payload_bytes(n)));
  }
  const shape s = shape_of(n);
  const auto r = static_cast<Eigen::Index>(s.rank);
  col_matrix p(static_cast<Eigen::Index>(s.rows), r), q(static_cast<Eigen::Index>(s.cols), r);
  std::memcpy(p.data(), payload.data(), 4 * s.rows * s.rank);
  std::memcpy(q.data(), payload.data() + 4 * s.rows * s.rank, 4 * s.cols * s.rank);
  add_product(p, q, out);
}

void powersgd_compressor::reduce(const communicator& comm, std::span<float> data,
                                 std::span<float> mine, std::uint64_t bucket_id, traffic& stats) {
  const std::size_t n = data.size();
  if (n == 0) throw usage_error(name() + " reduce: the tensor is empty; compression needs at least one element");
  if (!mine.empty() && mine.size() != n) {
    throw usage_error(fmt::format("{} reduce: `mine` has {} elements, data {}", name(), mine.size(), n));
  }
  const shape s = shape_of(n);
  const auto r = static_cast<Eigen::Index>(s.rank);
  const row_matrix m = as_matrix(data, s.rows, s.cols);
  std::vector<float>& warm = warm_q(bucket_id, s);
  col_matrix q = Eigen::Map<col_matrix>(warm.data(), static_cast<Eigen::Index>(s.cols), r);

  col_matrix p = m * q;
  allreduce(comm, std::span<float>(p.data(), static_cast<std::size_t>(p.size())), sum, algo::ring);
  // Every rank holds the same P bits, so every rank computes the same basis.
  orthogonalize(p);
  q = m.transpose() * p;
  // This rank's share of the result: P (M_r^T P)^T, linear in M_r, so the
  // shares sum to P (sum_r Q_r)^T exactly (up to float rounding).
  if (!mine.empty()) set_product(p, q, mine);
  allreduce(comm, std::span<float>(q.data(), static_cast<std::size_t>(q.size())), sum, algo::ring);
  set_product(p, q, data);
  std::memcpy(warm.data(), q.data(), warm.size() * sizeof(float));
  account(n, comm, stats);
}

}  // namespace ringflow::compress
