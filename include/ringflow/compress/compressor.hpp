// Gradient compressors: the runtime-polymorphic `compressor` interface and the
// six implementations (none, fp16, bf16, int8, top-k, 1-bit sign, PowerSGD).
//
// Why a virtual interface and not a concept: the compressor is picked per
// bucket at run time (`--compress topk:0.01`, or by the cost model in auto
// mode), so buckets hold heterogeneous compressors; the virtual call happens
// once per bucket, never per element. The per-element math lives in
// kernels.hpp as header functors, which is where inlining matters (and what
// the CUDA kernels reuse).
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "ringflow/coll/options.hpp"
#include "ringflow/comm/communicator.hpp"
#include "ringflow/core/half.hpp"

namespace ringflow::compress {

/// How the encoded payloads of the ranks are combined.
enum class combine {
  sum,     ///< payloads are summed in compressed form: they ride on allreduce
  gather,  ///< payloads are allgathered and each rank decodes and sums them
};

/// One collective a compressed allreduce issues: its kind and the bytes of one
/// rank's contribution (for allreduce: the whole buffer; for allgather: one piece).
struct wire_round {
  combine kind = combine::sum;
  std::size_t bytes = 0;
  std::size_t element_size = 4;  ///< element size on the wire (for the exact ring byte count)
};

/// Bytes one ring collective makes rank `rank` send (exact for ringflow's ring:
/// reduce-scatter sends every chunk but its own, allgather every chunk but the
/// next rank's). For combine::gather, `round.bytes` is one rank's piece.
std::size_t ring_bytes_sent(const wire_round& round, int ranks, int rank);

/// Traffic of one compressed allreduce (or the running total of many).
struct traffic {
  std::size_t calls = 0;
  std::size_t elements = 0;          ///< gradient elements reduced
  std::size_t raw_bytes = 0;         ///< 4 * elements: the fp32 bucket
  std::size_t payload_bytes = 0;     ///< one rank's encoded payload (all rounds)
  std::size_t bytes_sent = 0;        ///< what this rank put on the wire
  std::size_t plain_bytes_sent = 0;  ///< what an fp32 ring allreduce would have sent

  traffic& operator+=(const traffic& o);
  /// raw_bytes / payload_bytes (1 for none, 2 for fp16, ~32 for sign...).
  double ratio() const;
};

/// One parameter tensor inside a bucket: the row-major rows x cols block at
/// elements [offset, offset + rows * cols) of the bucket. A 1-D tensor (a
/// bias) is 1 x n.
struct tensor_shape {
  std::size_t offset = 0;
  std::size_t rows = 0;
  std::size_t cols = 0;
  std::size_t size() const noexcept { return rows * cols; }
  friend bool operator==(const tensor_shape&, const tensor_shape&) = default;
};

/// How a bucket of `size` elements is made of parameter tensors. The tensors
/// may come in any order and need not cover the bucket (elements outside
/// every tensor are allowed), but they must not overlap or reach past `size`.
///
/// @code
/// // A 784x256 weight followed by its 256 bias values:
/// ringflow::compress::bucket_layout l{784 * 256 + 256, {{0, 784, 256}, {784 * 256, 1, 256}}};
/// c->set_layout(l);   // PowerSGD then compresses the weight as its own matrix
/// @endcode
struct bucket_layout {
  std::size_t size = 0;
  std::vector<tensor_shape> tensors;
  /// Throws usage_error naming the tensor if one is empty, overflows, lies
  /// (partly) outside [0, size) or overlaps another.
  void validate() const;
};

/// What a compressor carries from one call to the next, for checkpoints:
/// the call counter that picks int8's and top-k's random streams, and
/// PowerSGD's warm-start Q per bucket id. Stateless compressors (none, fp16,
/// bf16, sign) have neither.
struct compressor_state {
  std::uint64_t counter = 0;
  std::map<std::uint64_t, std::vector<float>> warm_start = {};
  friend bool operator==(const compressor_state&, const compressor_state&) = default;
};

/// A gradient compressor. encode/decode work on one rank's data; reduce() is
/// the collective form that every compressed allreduce goes through.
///
/// Contract of reduce(): on entry `data` is this rank's input x_r; on return it
/// holds sum_r t_r on every rank (bitwise the same on all ranks), where t_r is
/// what rank r transmitted, i.e. its decoded contribution. If `mine` is not
/// empty it receives t_r, so error feedback can keep x_r - t_r.
class compressor {
 public:
  virtual ~compressor() = default;

  /// The spec that make_compressor() parses back, e.g. "topk:0.01".
  virtual std::string name() const = 0;
  /// Whether the payload is summed by allreduce or needs an allgather.
  virtual combine how() const = 0;
  /// Whether the compression is biased enough to need error feedback
  /// (top-k, sign, PowerSGD). compressed_allreduce does not force it.
  virtual bool wants_error_feedback() const { return false; }

  /// Bytes of encode()'s payload for n elements.
  virtual std::size_t payload_bytes(std::size_t n) const = 0;
  /// The collectives reduce() issues for n elements on `ranks` ranks.
  virtual std::vector<wire_round> wire_plan(std::size_t n, int ranks) const = 0;

  /// Encodes `in` into out (out.size() == payload_bytes(in.size())).
  /// `bucket_id` keys per-bucket state (PowerSGD's warm start).
  virtual void encode(std::span<const float> in, std::span<std::byte> out,
                      std::uint64_t bucket_id = 0) = 0;
  /// out += decode(payload). The decode-and-accumulate form is what both the
  /// allgather path and a fused GPU kernel want.
  virtual void decode_add(std::span<const std::byte> payload, std::span<float> out) const = 0;
  /// out = decode(payload).
  void decode(std::span<const std::byte> payload, std::span<float> out) const;

  /// The collective (see the class comment). Adds its traffic to `stats`.
  virtual void reduce(const communicator& comm, std::span<float> data, std::span<float> mine,
                      std::uint64_t bucket_id, traffic& stats) = 0;

  /// Running total over every reduce() of this compressor.
  const traffic& cumulative() const noexcept { return cumulative_; }

  /// The state the next call depends on (see compressor_state); restoring
  /// it into a compressor of the same spec and seed continues the same
  /// random streams and warm starts bit for bit.
  virtual compressor_state state() const { return {}; }
  /// Restores state(). A compressor without state accepts only an empty
  /// one; PowerSGD checks each Q's size against the layout, if one is set.
  /// usage_error on a mismatch (nothing changed then).
  virtual void load_state(const compressor_state& s);

  /// Declares the parameter tensors of the buckets this compressor will see
  /// (validated: a bad layout throws usage_error). Element-wise compressors
  /// ignore it; PowerSGD compresses each 2-D tensor as its own matrix and
  /// then only accepts buckets of exactly `layout.size` elements. Without a
  /// layout (the default) a bucket is treated as one flat tensor.
  void set_layout(bucket_layout layout);
  /// Back to "no layout".
  void clear_layout() noexcept { layout_.reset(); }
  const std::optional<bucket_layout>& layout() const noexcept { return layout_; }

 protected:
  traffic cumulative_;
  std::optional<bucket_layout> layout_;
  /// Fills the byte counts of `stats` from wire_plan and adds them to cumulative_.
  void account(std::size_t n, const communicator& comm, traffic& stats);
};

/// Parses a spec: none | fp16 | bf16 | int8[:block] | topk:<ratio> | sign[:block]
/// | powersgd:<rank>. Throws usage_error naming the bad part.
std::unique_ptr<compressor> make_compressor(std::string_view spec, std::uint64_t seed = 0);

/// No compression: the fp32 ring allreduce (the baseline auto mode compares with).
class none_compressor final : public compressor {
 public:
  std::string name() const override { return "none"; }
  combine how() const override { return combine::sum; }
  std::size_t payload_bytes(std::size_t n) const override { return 4 * n; }
  std::vector<wire_round> wire_plan(std::size_t n, int ranks) const override;
  void encode(std::span<const float> in, std::span<std::byte> out, std::uint64_t = 0) override;
  void decode_add(std::span<const std::byte> payload, std::span<float> out) const override;
  void reduce(const communicator& comm, std::span<float> data, std::span<float> mine,
              std::uint64_t bucket_id, traffic& stats) override;
  /// The uncompressed average itself: allreduce(comm, data, avg, opt), bit for
  /// bit what a trainer without compression does (reduce() sums on the ring
  /// and leaves the division to compressed_allreduce). Counts the fp32 ring's
  /// bytes (what plain_bytes_sent counts, whatever algorithm `opt` picks).
  void average(const communicator& comm, std::span<float> data, const coll_options& opt,
               traffic& stats);
};

/// fp16 or bf16 on the wire. reduce() rounds each rank's values to 16 bits and
/// runs the ring allreduce in that type: every hop adds in fp32 and rounds the
/// partial sum back to 16 bits (see docs/compression.md for the error bound).
/// fp16 overflows to Inf above 65504 (sums included); bf16 has fp32's range.
class half_compressor final : public compressor {
 public:
  enum class format { fp16, bf16 };
  explicit half_compressor(format f) : format_(f) {}
  std::string name() const override { return format_ == format::fp16 ? "fp16" : "bf16"; }
  combine how() const override { return combine::sum; }
  std::size_t payload_bytes(std::size_t n) const override { return 2 * n; }
  std::vector<wire_round> wire_plan(std::size_t n, int ranks) const override;
  void encode(std::span<const float> in, std::span<std::byte> out, std::uint64_t = 0) override;
  void decode_add(std::span<const std::byte> payload, std::span<float> out) const override;
  void reduce(const communicator& comm, std::span<float> data, std::span<float> mine,
              std::uint64_t bucket_id, traffic& stats) override;

 private:
  format format_;
  std::vector<half> wire_fp16_;
  std::vector<bfloat16> wire_bf16_;
};

/// int8 with one fp32 scale per block of `block` elements and seeded
/// stochastic rounding. Payload: the block scales, then one int8 per element.
/// reduce(): a max-allreduce of the block scales gives every rank the same
/// scale; each rank quantizes to [-L, L] with L = floor(127 / ranks), so the
/// int8 ring sum (done in int32 per hop, stored back in int8) can never
/// overflow: |sum| <= ranks * L <= 127. Precision therefore drops with the
/// rank count (L = 31 at 4 ranks, 7 at 16); more than 127 ranks is rejected.
class int8_compressor final : public compressor {
 public:
  explicit int8_compressor(std::size_t block = 256, std::uint64_t seed = 0);
  std::string name() const override;
  combine how() const override { return combine::sum; }
  std::size_t payload_bytes(std::size_t n) const override;
  std::vector<wire_round> wire_plan(std::size_t n, int ranks) const override;
  void encode(std::span<const float> in, std::span<std::byte> out, std::uint64_t = 0) override;
  void decode_add(std::span<const std::byte> payload, std::span<float> out) const override;
  void reduce(const communicator& comm, std::span<float> data, std::span<float> mine,
              std::uint64_t bucket_id, traffic& stats) override;
  std::size_t block() const noexcept { return block_; }
  compressor_state state() const override { return {step_, {}}; }
  void load_state(const compressor_state& s) override;

 private:
  std::size_t block_;
  std::uint64_t seed_;
  std::uint64_t step_ = 0;  // per-call counter: the random stream differs each call
  std::vector<float> scales_;
  std::vector<std::int8_t> q_;
};

/// Base of the compressors whose payloads cannot be summed (top-k, sign):
/// reduce() allgathers every rank's payload and decodes them in rank order,
/// so every rank adds the same values in the same order.
class gather_compressor : public compressor {
 public:
  combine how() const override { return combine::gather; }
  void reduce(const communicator& comm, std::span<float> data, std::span<float> mine,
              std::uint64_t bucket_id, traffic& stats) final;

 private:
  std::vector<std::uint8_t> send_, recv_;
};

/// Top-k by magnitude: keeps k = ceil(ratio * n) elements as (uint32 index,
/// float value) pairs, allgathered. Selection is exact: tensors of up to
/// `exact_limit` elements use nth_element; larger ones first keep the elements
/// above a threshold estimated from a seeded sample (with slack), then select
/// among those, falling back to the full nth_element if too few passed.
/// Ties are broken by the lower index, so the choice is deterministic.
class topk_compressor final : public gather_compressor {
 public:
  explicit topk_compressor(double ratio, std::uint64_t seed = 0,
                           std::size_t exact_limit = std::size_t{1} << 16);
  std::string name() const override;
  bool wants_error_feedback() const override { return true; }
  std::size_t k(std::size_t n) const;
  std::size_t payload_bytes(std::size_t n) const override { return 8 * k(n); }
  std::vector<wire_round> wire_plan(std::size_t n, int ranks) const override;
  void encode(std::span<const float> in, std::span<std::byte> out, std::uint64_t = 0) override;
  void decode_add(std::span<const std::byte> payload, std::span<float> out) const override;
  compressor_state state() const override { return {step_, {}}; }
  void load_state(const compressor_state& s) override;

 private:
  double ratio_;
  std::uint64_t seed_;
  std::size_t exact_limit_;
  std::uint64_t step_ = 0;
  std::vector<std::uint32_t> idx_;
};

/// 1-bit scaled sign: one bit per element (32 per uint32 word) and one fp32
/// scale per block of `block` elements, the mean |x| of the block.
/// Payload: the block scales, then ceil(n / 32) words. Allgathered.
class sign_compressor final : public gather_compressor {
 public:
  explicit sign_compressor(std::size_t block = 256);
  std::string name() const override;
  bool wants_error_feedback() const override { return true; }
  std::size_t payload_bytes(std::size_t n) const override;
  std::vector<wire_round> wire_plan(std::size_t n, int ranks) const override;
  void encode(std::span<const float> in, std::span<std::byte> out, std::uint64_t = 0) override;
  void decode_add(std::span<const std::byte> payload, std::span<float> out) const override;

 private:
  std::size_t block_;
};

/// PowerSGD of rank r, one warm-started power iteration per step for each
/// matrix of the bucket: P = M Q; allreduce P; P = orthonormal basis of P
/// (Householder QR); Q = M^T P; allreduce Q; result P Q^T. Q is kept per
/// (bucket id, matrix) between calls. This rank's transmitted part is
/// P (M^T P)^T, so the ranks' parts sum exactly to the result.
///
/// Which matrices: with a layout (set_layout), every 2-D tensor whose rank-r
/// factors take less than half its size (r (rows + cols) * 2 < rows * cols,
/// the test of PyTorch's PowerSGD hook with min_compression_rate = 2) is
/// its own rows x cols matrix, with rank min(r, rows, cols); everything else
/// (biases and other 1-D tensors, small matrices, elements outside every
/// tensor) is sent uncompressed. Without a layout the whole bucket is one
/// near-square matrix (rows = ceil(sqrt(n)), zero padded). Still two
/// allreduces per bucket: every P and the uncompressed elements in the first,
/// every Q in the second (none when nothing is compressed).
/// Payload: the P's, the uncompressed values, the Q's, all fp32.
class powersgd_compressor final : public compressor {
 public:
  explicit powersgd_compressor(int rank, std::uint64_t seed = 0);
  std::string name() const override;
  combine how() const override { return combine::sum; }
  bool wants_error_feedback() const override { return true; }
  std::size_t payload_bytes(std::size_t n) const override;
  std::vector<wire_round> wire_plan(std::size_t n, int ranks) const override;
  void encode(std::span<const float> in, std::span<std::byte> out,
              std::uint64_t bucket_id = 0) override;
  void decode_add(std::span<const std::byte> payload, std::span<float> out) const override;
  void reduce(const communicator& comm, std::span<float> data, std::span<float> mine,
              std::uint64_t bucket_id, traffic& stats) override;

  /// The near-square matrix a bucket of n elements is viewed as without a
  /// layout, and the rank used.
  struct shape {
    std::size_t rows = 0, cols = 0, rank = 0;
  };
  shape shape_of(std::size_t n) const;

  /// One compressed matrix: bucket elements [offset, offset + size) viewed as
  /// a row-major rows x cols matrix (size < rows * cols only without a
  /// layout: the zero padding).
  struct matrix {
    std::size_t offset = 0, size = 0, rows = 0, cols = 0, rank = 0;
  };
  /// An uncompressed run of bucket elements [offset, offset + size).
  struct span_range {
    std::size_t offset = 0, size = 0;
  };
  /// What reduce() does with a bucket of n elements.
  struct plan {
    std::vector<matrix> matrices;  ///< by offset
    std::vector<span_range> raw;   ///< by offset, disjoint from the matrices
    std::size_t p_floats = 0;      ///< sum of rows * rank
    std::size_t q_floats = 0;      ///< sum of cols * rank
    std::size_t raw_floats = 0;    ///< sum of raw sizes
  };
  /// The plan for n elements: from the layout if one is set (a usage_error
  /// if n differs from its size), else one matrix of shape_of(n).
  plan plan_of(std::size_t n) const;

  /// Forgets the warm-start Q of every bucket.
  void reset() { warm_.clear(); }
  compressor_state state() const override { return {0, warm_}; }
  void load_state(const compressor_state& s) override;

 private:
  std::vector<float>& warm_q(std::uint64_t bucket_id, const plan& pl);
  int rank_;
  std::uint64_t seed_;
  std::map<std::uint64_t, std::vector<float>> warm_;
};

}  // namespace ringflow::compress
