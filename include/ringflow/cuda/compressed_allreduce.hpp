// Compressed allreduce of a device gradient bucket through NCCL: fused encode
// kernel, one or two NCCL collectives, fused decode kernel, all queued on one
// stream with no host synchronization. The GPU twin of
// ringflow::compressed_allreduce (compress/compressed_allreduce.hpp).
//
// Needs the CUDA toolkit and NCCL headers: include only where
// RINGFLOW_HAS_CUDA and RINGFLOW_HAS_NCCL are 1.
#pragma once

#include <cuda_runtime_api.h>
#include <nccl.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

namespace ringflow::compress {
class compressor;
struct bucket_layout;
}  // namespace ringflow::compress

namespace ringflow::cuda {

/// What compressed_allreduce needs to know and keep about one compressor:
/// the parsed spec, the seed, the call counter of the random streams (the CPU
/// compressor's `step`) and a device workspace (grown stream-ordered with
/// cudaMallocAsync on the stream of the call that needs more; never shrunk).
/// Use one object per stream (or order the streams): the workspace is reused
/// by the next call.
class device_compressor {
 public:
  /// spec: none | fp16 | bf16 | int8[:block] | sign[:block] | topk:<ratio> |
  /// powersgd:<rank>, as compress::make_compressor parses it (a bad spec
  /// throws usage_error). bucket_id: only PowerSGD uses it, to draw the CPU
  /// compressor's warm-start Q of that bucket (one device_compressor holds
  /// the warm start of one bucket).
  explicit device_compressor(std::string_view spec, std::uint64_t seed = 0,
                             std::uint64_t bucket_id = 0);
  device_compressor(device_compressor&&) noexcept;
  device_compressor& operator=(device_compressor&&) noexcept;
  device_compressor(const device_compressor&) = delete;
  device_compressor& operator=(const device_compressor&) = delete;
  /// Frees the workspace (cudaFree, which waits for the device).
  ~device_compressor();

  /// The spec, normalized as the CPU compressor's name() ("int8", "topk:0.01").
  std::string name() const;
  /// Whether error feedback is advised (top-k, sign), as on the CPU.
  bool wants_error_feedback() const;
  /// Bytes of one rank's payload for n elements.
  std::size_t payload_bytes(std::size_t n) const;
  /// Calls so far: the `step` of the random streams of the next call.
  std::uint64_t calls() const noexcept;
  /// The parameter tensors of the bucket, as compress::compressor::set_layout
  /// (validated: a bad layout throws usage_error). Only PowerSGD uses it
  /// (each 2-D tensor its own matrix); then every call must have n ==
  /// layout.size (else usage_error). A layout whose plan has another number
  /// of Q floats restarts the warm start, as on the CPU.
  void set_layout(const compress::bucket_layout& layout);

  struct impl;

 private:
  std::unique_ptr<impl> impl_;
  friend void compressed_allreduce(ncclComm_t, int, int, float*, std::size_t, device_compressor&,
                                   float*, cudaStream_t);
};

/// Replaces the n floats at `grads` (device) on every rank with the average
/// over the ranks of what each rank transmitted through `c`, bitwise the same
/// on all ranks. With a `residual` (n device floats, zeros at first), error
/// feedback: c = grads + residual is compressed and residual = c - what was
/// transmitted. Everything is queued on `s`; nothing waits for the device.
///
///   none:      residual folded in, ncclAllReduce(float sum), / nranks
///   fp16/bf16: fused encode, ncclAllReduce(half / bfloat16 sum), decode / nranks
///   int8:      block max |c|, ncclAllReduce(max of the scales' bits), quantize
///              to levels 127 / nranks, ncclAllReduce(int8 sum: cannot
///              overflow), decode / nranks
///   sign:      fused encode into this rank's slot, ncclAllGather, one fused
///              pass decoding every rank's payload in rank order, / nranks
///   top-k:     fused selection into this rank's slot, ncclAllGather,
///              scatter-add rank by rank, / nranks
///   powersgd:  per matrix of the CPU compressor's plan P = M Q (warm Q);
///              ncclAllReduce(sum) of every P and the raw elements; per
///              matrix P = Householder basis of P, Q = M^T P;
///              ncclAllReduce(sum) of every Q into the warm Q; per matrix
///              one pass out = P Q^T / nranks, residual = c - P Q_mine^T
///
/// Bit for bit the CPU ringflow::compressed_allreduce with
/// make_compressor(spec, seed) called as many times before, given the same
/// inputs on every rank: at any nranks for int8 (integer sums), sign and
/// top-k (decoded in rank order), at nranks 1 for none and fp16/bf16 (with
/// more ranks NCCL adds floats in its own order, the CPU ring in ringflow's).
/// PowerSGD equals the CPU's to rounding only (its products and QR sum floats
/// in another order than Eigen). `rank` and `nranks` must be this rank's
/// place in `comm` (checked against NCCL). Every rank calls with the same n,
/// spec and call order. nranks > 127 with int8 is refused.
void compressed_allreduce(ncclComm_t comm, int rank, int nranks, float* grads, std::size_t n,
                          device_compressor& c, float* residual, cudaStream_t s);

}  // namespace ringflow::cuda
