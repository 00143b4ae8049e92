// compressed_allreduce and the per-bucket error-feedback residuals.
#include "ringflow/compress/compressed_allreduce.hpp"

#include <fmt/format.h>

#include <cmath>

#include "ringflow/compress/kernels.hpp"
#include "ringflow/core/error.hpp"

namespace ringflow::compress {

std::span<float> error_feedback::residual(std::uint64_t bucket_id, std::size_t n) {
  auto [it, fresh] = residuals_.try_emplace(bucket_id);
  if (fresh) {
    it->second.assign(n, 0.0f);
  } else if (it->second.size() != n) {
    throw usage_error(fmt::format(
        "error feedback: bucket {} had {} elements and now has {}; buckets must keep their layout "
        "between steps (call error_feedback::clear() after re-bucketing)",
        bucket_id, it->second.size(), n));
  }
  return it->second;
}

std::span<const float> error_feedback::find(std::uint64_t bucket_id) const {
  const auto it = residuals_.find(bucket_id);
  if (it == residuals_.end()) return {};
  return it->second;
}

void error_feedback::set(std::uint64_t bucket_id, std::vector<float> r) {
  if (r.empty()) {
    residuals_.erase(bucket_id);
  } else {
    residuals_[bucket_id] = std::move(r);
  }
}

double error_feedback::residual_l1() const {
  double s = 0;
  for (const auto& [id, r] : residuals_) {
    for (float v : r) s += std::abs(static_cast<double>(v));
  }
  return s;
}

}  // namespace ringflow::compress

namespace ringflow {

compress::traffic compressed_allreduce(const communicator& comm, std::span<float> grads,
                                       compress::compressor& c, std::uint64_t bucket_id,
                                       compress::error_feedback* ef) {
  if (grads.empty()) {
    throw usage_error(fmt::format(
        "compressed_allreduce on rank {}: bucket {} is empty; compression needs at least one "
        "element (skip empty buckets)",
        comm.rank(), bucket_id));
  }
  const std::size_t n = grads.size();
  compress::traffic t;
  if (!ef) {
    c.reduce(comm, grads, {}, bucket_id, t);
  } else {
    // residual <- c = g + r (and grads <- c), then residual <- c - transmitted.
    std::span<float> r = ef->residual(bucket_id, n);
    const compress::kernels::ef_compensate comp;
    for (std::size_t i = 0; i < n; ++i) r[i] = grads[i] = comp(grads[i], r[i]);
    std::vector<float> mine(n);
    c.reduce(comm, grads, mine, bucket_id, t);
    const compress::kernels::ef_residual next;
    for (std::size_t i = 0; i < n; ++i) r[i] = next(r[i], mine[i]);
  }
  // Average: one division per element, the same on every rank.
  const auto p = static_cast<float>(comm.size());
  if (comm.size() > 1) {
    for (float& g : grads) g /= p;
  }
  return t;
}

}  // namespace ringflow
