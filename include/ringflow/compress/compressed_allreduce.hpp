// Compressed allreduce of an fp32 gradient bucket, with optional error
// feedback that keeps one residual per bucket id.
#pragma once

#include <cstdint>
#include <span>
#include <unordered_map>
#include <vector>

#include "ringflow/comm/communicator.hpp"
#include "ringflow/compress/compressor.hpp"

namespace ringflow::compress {

/// Error-feedback state: one fp32 residual per bucket id, created as zeros on
/// first use. Each step compresses c = g + r and keeps r = c - t, where t is
/// what this rank transmitted, so nothing is lost, only delayed: over k steps
/// sum(t) + r_k = sum(g) (to float rounding).
class error_feedback {
 public:
  /// The residual of `bucket_id` (n zeros the first time). A bucket whose size
  /// changed is a usage_error: buckets must keep their layout between steps.
  std::span<float> residual(std::uint64_t bucket_id, std::size_t n);
  /// Whether a residual exists for the bucket.
  bool has(std::uint64_t bucket_id) const { return residuals_.count(bucket_id) != 0; }
  /// The residual of `bucket_id` if it exists, else empty (creates nothing).
  std::span<const float> find(std::uint64_t bucket_id) const;
  /// Replaces the residual of `bucket_id` (for checkpoints); an empty one
  /// removes it.
  void set(std::uint64_t bucket_id, std::vector<float> r);
  /// Drops every residual (e.g. after loading a checkpoint without them).
  void clear() { residuals_.clear(); }
  /// Sum of |r| over all buckets: a cheap health signal for logs.
  double residual_l1() const;

 private:
  std::unordered_map<std::uint64_t, std::vector<float>> residuals_;
};

}  // namespace ringflow::compress

namespace ringflow {

/// Replaces `grads` on every rank with the average over ranks of what each
/// rank transmitted through `c` (bitwise the same on all ranks), and returns
/// this call's traffic (also added to c.cumulative()). With `ef`, this rank's
/// residual of `bucket_id` is added before compression and updated after.
/// Every rank must call it with the same bucket size, compressor spec and
/// bucket id, in the same order.
///
/// @code
/// auto c = ringflow::compress::make_compressor("topk:0.01");
/// ringflow::compress::error_feedback ef;
/// auto t = ringflow::compressed_allreduce(comm, std::span(bucket), *c, /*bucket_id=*/3, &ef);
/// // t.bytes_sent, c->cumulative().bytes_sent
/// @endcode
compress::traffic compressed_allreduce(const communicator& comm, std::span<float> grads,
                                       compress::compressor& c, std::uint64_t bucket_id,
                                       compress::error_feedback* ef = nullptr);

}  // namespace ringflow
