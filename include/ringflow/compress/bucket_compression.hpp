// Per-bucket compression for a data-parallel trainer: one compressor and one
// error-feedback residual per bucket, chosen from a `--compress` spec
// (none|fp16|bf16|int8|topk:<ratio>|sign|powersgd:<rank>|auto).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "ringflow/comm/communicator.hpp"
#include "ringflow/compress/compressed_allreduce.hpp"
#include "ringflow/compress/compressor.hpp"
#include "ringflow/compress/decide.hpp"

namespace ringflow::compress {

/// Options of bucket_compression.
struct bucket_compression_options {
  std::uint64_t seed = 0;
  /// Error feedback: on for the compressors that want it (top-k, sign,
  /// PowerSGD) unless forced either way here.
  std::optional<bool> error_feedback = {};
  /// The link `auto` plans for (default: link_model::for_this_machine(), i.e.
  /// RINGFLOW_LINK_GBPS / _ALPHA_US if set, else the calibrated cost model).
  std::optional<link_model> link = {};
  /// The compressors `auto` chooses among (besides none).
  std::vector<std::string> auto_candidates = {"bf16", "int8"};
  /// How a bucket that goes uncompressed (`none`, or `auto`'s choice of none)
  /// without error feedback is averaged: allreduce(comm, grads, avg,
  /// plain_coll), the very call of an uncompressed trainer, so `auto` costs
  /// nothing where it picks none. train::data_parallel passes its coll options.
  coll_options plain_coll = {};
};

/// What one bucket's compression carries from step to step (see
/// bucket_compression::state()).
struct bucket_state {
  std::size_t bucket = 0;
  std::string spec;  ///< the bucket's compressor (its name(), never "auto")
  bool error_feedback = false;
  std::vector<float> residual;  ///< error feedback's residual of this rank (empty without)
  compressor_state codec;       ///< counters, warm starts
  friend bool operator==(const bucket_state&, const bucket_state&) = default;
};

/// Compressed averaging of a trainer's gradient buckets.
///
/// Call reduce() for every bucket of every step, with the same bucket index
/// for the same slice each step, on every rank in the same order (it runs
/// collectives). In `auto` mode the first reduce() of a bucket picks its
/// compressor with the cost model on rank 0 and broadcasts the choice, so
/// every rank uses the same one even though codec timings differ per rank.
///
/// @code
/// ringflow::compress::bucket_compression bc("topk:0.01");
/// for (std::size_t b = 0; b < buckets.size(); ++b)
///   bc.reduce(comm, grads.subspan(buckets[b].offset, buckets[b].size), b);  // averaged in place
/// fmt::print("{} bytes sent\n", bc.total().bytes_sent);
/// @endcode
class bucket_compression {
 public:
  explicit bucket_compression(std::string spec, bucket_compression_options opts = {});

  /// Averages `grads` over the ranks of `comm` in place through the bucket's
  /// compressor. Returns this call's traffic (also added to total()).
  traffic reduce(const communicator& comm, std::span<float> grads, std::size_t bucket_index);

  /// Declares the parameter tensors of bucket `bucket_index` (offsets relative
  /// to the bucket), so PowerSGD compresses one matrix per 2-D tensor instead
  /// of the whole bucket as one matrix. Validates now (usage_error on overlap
  /// or a tensor outside the bucket); applies from the bucket's next reduce().
  /// Element-wise compressors ignore it. train::data_parallel calls it for
  /// every bucket.
  void set_layout(std::size_t bucket_index, bucket_layout layout);

  /// The spec given to the constructor ("auto" included).
  const std::string& spec() const noexcept { return spec_; }
  /// The compressor a bucket uses ("" before its first reduce()).
  std::string spec_of(std::size_t bucket_index) const;
  /// Traffic of every reduce() so far.
  const traffic& total() const noexcept { return total_; }
  /// The residuals (empty unless error feedback is on for some bucket).
  const error_feedback& residuals() const noexcept { return ef_; }

  /// Everything the next reduce() depends on, per bucket reduced at least
  /// once, in bucket order: the compressor picked (auto's choice included),
  /// error feedback and this rank's residual, the compressor's counters and
  /// warm starts. Restored by load_state(), a run continues bit for bit.
  /// Read it between steps (not while reductions are in flight).
  std::vector<bucket_state> state() const;
  /// Throws usage_error naming the bucket if `s` cannot be restored here: a
  /// compressor this spec would not use, error feedback on where it is off
  /// (or the reverse), a residual of another size than the bucket's layout,
  /// a bucket the layouts do not have, counters or warm starts the
  /// compressor does not keep. Changes nothing.
  void check_state(const std::vector<bucket_state>& s) const;
  /// check_state(), then replaces every bucket's compressor, residual and
  /// counters with `s`; buckets not in `s` start afresh (as never reduced).
  /// Call between steps.
  void load_state(const std::vector<bucket_state>& s);

 private:
  struct slot {
    std::unique_ptr<compressor> c;
    bool ef = false;
    std::optional<bucket_layout> layout;
  };
  slot& slot_for(const communicator& comm, std::size_t bucket_index, std::size_t n);
  std::unique_ptr<compressor> restored(const bucket_state& b) const;

  std::string spec_;
  bucket_compression_options opts_;
  std::vector<slot> slots_;
  error_feedback ef_;
  traffic total_;
  std::unique_ptr<auto_policy> policy_;
};

}  // namespace ringflow::compress
