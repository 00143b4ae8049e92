// Device compressed allreduce through NCCL (ringflow/cuda/compressed_allreduce.hpp):
// host glue that queues the fused kernels of src/cuda/compress_*.cu and the
// NCCL collectives on one stream. Host code (the C++ compiler): it may format.
#if RINGFLOW_HAS_NCCL

#include "ringflow/cuda/compressed_allreduce.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <string>
#include <utility>

#include "ringflow/compress/compressor.hpp"
#include "ringflow/compress/kernels.hpp"
#include "ringflow/core/error.hpp"
#include "ringflow/cuda/check.hpp"
#include "ringflow/cuda/compress.hpp"
#include "ringflow/cuda/reduce.hpp"

namespace ringflow::cuda {

namespace {

void check_nccl(ncclResult_t rc, const char* call, int rank) {
  if (rc != ncclSuccess) {
    throw ringflow::error(fmt::format("rank {}: {} failed: {} (ncclResult_t {})", rank, call,
                                      ncclGetErrorString(rc), static_cast<int>(rc)));
  }
}

#define RF_NCCL(call) check_nccl((call), #call, rank)

std::size_t align256(std::size_t x) { return (x + 255) / 256 * 256; }

}  // namespace

struct device_compressor::impl {
  enum class kind { none, fp16, bf16, int8, sign, topk, powersgd };
  kind what = kind::none;
  std::unique_ptr<compress::compressor> cpu;  // name, payload sizes, top-k's k(n)
  std::size_t block = 0;
  std::uint64_t seed = 0;
  std::uint64_t step = 0;
  void* ws = nullptr;
  std::size_t ws_bytes = 0;
  // PowerSGD: the warm-start Q of every matrix of the plan (the CPU's
  // warm_q of bucket `bucket_id`), q_floats of them; 0: not drawn yet.
  std::uint64_t bucket_id = 0;
  float* warm = nullptr;
  std::size_t warm_floats = 0;

  /// At least `bytes` of device workspace, grown in stream order on `s`.
  unsigned char* reserve(std::size_t bytes, cudaStream_t s) {
    if (bytes > ws_bytes) {
      // Grow by half again, so buckets of slowly increasing size do not
      // reallocate every call.
      const std::size_t want = std::max(bytes, ws_bytes + ws_bytes / 2);
      if (ws) {
        RINGFLOW_CHECK_CUDA(cudaFreeAsync(ws, s));
        ws = nullptr;
        ws_bytes = 0;
      }
      RINGFLOW_CHECK_CUDA(cudaMallocAsync(&ws, want, s));
      ws_bytes = want;
    }
    return static_cast<unsigned char*>(ws);
  }
};

device_compressor::device_compressor(std::string_view spec, std::uint64_t seed,
                                     std::uint64_t bucket_id)
    : impl_(std::make_unique<impl>()) {
  impl& m = *impl_;
  using kind = impl::kind;
  m.cpu = compress::make_compressor(spec, seed);  // validates the spec
  m.seed = seed;
  m.bucket_id = bucket_id;
  const std::string name = m.cpu->name();
  const std::string_view kind_name = std::string_view(name).substr(0, name.find(':'));
  if (kind_name == "none") {
    m.what = kind::none;
  } else if (kind_name == "fp16") {
    m.what = kind::fp16;
  } else if (kind_name == "bf16") {
    m.what = kind::bf16;
  } else if (kind_name == "int8") {
    m.what = kind::int8;
    m.block = dynamic_cast<const compress::int8_compressor&>(*m.cpu).block();
  } else if (kind_name == "sign") {
    m.what = kind::sign;
    // name() is "sign" for the default block and "sign:<block>" otherwise.
    m.block = name == "sign" ? 256 : std::stoul(name.substr(5));
  } else if (kind_name == "topk") {
    m.what = kind::topk;
  } else if (kind_name == "powersgd") {
    m.what = kind::powersgd;
  } else {
    throw not_supported_error(fmt::format(
        "cuda::device_compressor: '{}' has no device implementation (none, fp16, bf16, int8, "
        "sign, topk and powersgd do); use the CPU compressor",
        spec));
  }
}

device_compressor::device_compressor(device_compressor&&) noexcept = default;
device_compressor& device_compressor::operator=(device_compressor&&) noexcept = default;

device_compressor::~device_compressor() {
  if (impl_ && impl_->ws) RINGFLOW_LOG_CUDA(cudaFree(impl_->ws));
  if (impl_ && impl_->warm) RINGFLOW_LOG_CUDA(cudaFree(impl_->warm));
}

std::string device_compressor::name() const { return impl_->cpu->name(); }
bool device_compressor::wants_error_feedback() const { return impl_->cpu->wants_error_feedback(); }
std::size_t device_compressor::payload_bytes(std::size_t n) const {
  return impl_->cpu->payload_bytes(n);
}
std::uint64_t device_compressor::calls() const noexcept { return impl_->step; }
void device_compressor::set_layout(const compress::bucket_layout& layout) {
  impl_->cpu->set_layout(layout);  // validates
}

namespace {

// PowerSGD's step on the device, the order of powersgd_compressor::reduce
// with compressed_allreduce's error feedback around it. Workspace:
// [P's | raw] (the first allreduce), Q_mine (this rank's Q's, kept for the
// residual), the QR scratch; the summed Q's land in the warm buffer.
void powersgd_allreduce(ncclComm_t comm, int rank, int nranks, float* grads, std::size_t n,
                        device_compressor::impl& m, float* residual, cudaStream_t s) {
  const auto& cpu = dynamic_cast<const compress::powersgd_compressor&>(*m.cpu);
  const compress::powersgd_compressor::plan pl = cpu.plan_of(n);  // checks n against the layout
  if (m.warm_floats != pl.q_floats || (pl.q_floats > 0 && m.warm == nullptr)) {
    // The CPU's warm_q: each matrix draws its stream from index 0.
    if (m.warm) {
      RINGFLOW_CHECK_CUDA(cudaFreeAsync(m.warm, s));
      m.warm = nullptr;
      m.warm_floats = 0;
    }
    if (pl.q_floats > 0) {
      RINGFLOW_CHECK_CUDA(cudaMallocAsync(reinterpret_cast<void**>(&m.warm), 4 * pl.q_floats, s));
      const std::uint64_t key = compress::kernels::stream_key(m.seed, m.bucket_id, 0x9a5d);
      std::size_t at = 0;
      for (const auto& mt : pl.matrices) {
        powersgd_init_q(m.warm + at, mt.cols * mt.rank, key, s);
        at += mt.cols * mt.rank;
      }
    }
    m.warm_floats = pl.q_floats;
  }
  std::size_t scratch = 0;
  for (const auto& mt : pl.matrices) {
    scratch = std::max(scratch, powersgd_orthonormalize_scratch_floats(mt.rows, mt.rank));
  }
  const std::size_t first_floats = pl.p_floats + pl.raw_floats;
  const std::size_t first_bytes = align256(4 * first_floats);
  const std::size_t qmine_bytes = align256(4 * pl.q_floats);
  unsigned char* ws = m.reserve(first_bytes + qmine_bytes + 4 * scratch, s);
  auto* first = reinterpret_cast<float*>(ws);
  auto* q_mine = reinterpret_cast<float*>(ws + first_bytes);
  auto* qr_scratch = reinterpret_cast<float*>(ws + first_bytes + qmine_bytes);

  // c = g + r (grads holds c from here on; the residual is rewritten last).
  powersgd_fold(grads, residual, n, s);
  // First allreduce: every P = M Q, then the uncompressed elements.
  std::size_t pa = 0, qa = 0;
  for (const auto& mt : pl.matrices) {
    powersgd_mq(grads + mt.offset, mt.size, mt.rows, mt.cols, mt.rank, m.warm + qa, first + pa, s);
    pa += mt.rows * mt.rank;
    qa += mt.cols * mt.rank;
  }
  float* raw = first + pl.p_floats;
  for (const auto& g : pl.raw) {
    RINGFLOW_CHECK_CUDA(
        cudaMemcpyAsync(raw, grads + g.offset, 4 * g.size, cudaMemcpyDeviceToDevice, s));
    raw += g.size;
  }
  RF_NCCL(ncclAllReduce(first, first, first_floats, ncclFloat32, ncclSum, comm, s));
  // Every rank holds the same P bits, so every rank computes the same bases.
  pa = qa = 0;
  for (const auto& mt : pl.matrices) {
    powersgd_orthonormalize(first + pa, mt.rows, mt.rank, qr_scratch, s);
    powersgd_mtp(grads + mt.offset, mt.size, mt.rows, mt.cols, mt.rank, first + pa, q_mine + qa, s);
    pa += mt.rows * mt.rank;
    qa += mt.cols * mt.rank;
  }
  // Second allreduce, into the warm start of the next call (P = M Q above
  // has read the old one).
  if (pl.q_floats > 0) {
    RF_NCCL(ncclAllReduce(q_mine, m.warm, pl.q_floats, ncclFloat32, ncclSum, comm, s));
  }
  pa = qa = 0;
  for (const auto& mt : pl.matrices) {
    powersgd_decode_ef(grads + mt.offset, residual ? residual + mt.offset : nullptr, mt.size,
                       mt.rows, mt.cols, mt.rank, first + pa, q_mine + qa, m.warm + qa, nranks, s);
    pa += mt.rows * mt.rank;
    qa += mt.cols * mt.rank;
  }
  raw = first + pl.p_floats;
  for (const auto& g : pl.raw) {
    powersgd_raw_ef(grads + g.offset, residual ? residual + g.offset : nullptr, g.size, raw, nranks,
                    s);
    raw += g.size;
  }
}

}  // namespace

void compressed_allreduce(ncclComm_t comm, int rank, int nranks, float* grads, std::size_t n,
                          device_compressor& c, float* residual, cudaStream_t s) {
  device_compressor::impl& m = *c.impl_;
  if (n == 0) {
    throw usage_error(fmt::format(
        "cuda::compressed_allreduce on rank {}: the bucket is empty; compression needs at least "
        "one element (skip empty buckets)",
        rank));
  }
  int comm_size = 0, comm_rank = 0;
  RF_NCCL(ncclCommCount(comm, &comm_size));
  RF_NCCL(ncclCommUserRank(comm, &comm_rank));
  if (comm_size != nranks || comm_rank != rank) {
    throw usage_error(fmt::format(
        "cuda::compressed_allreduce: called as rank {} of {}, but the NCCL communicator says rank "
        "{} of {}",
        rank, nranks, comm_rank, comm_size));
  }
  using kind = device_compressor::impl::kind;
  const std::uint64_t step = m.step++;
  const auto ranks = static_cast<std::size_t>(nranks);
  switch (m.what) {
    case kind::none: {
      none_ef_encode(grads, residual, n, s);
      RF_NCCL(ncclAllReduce(grads, grads, n, ncclFloat32, ncclSum, comm, s));
      if (nranks > 1) finish(dtype::f32, op_kind::avg, grads, n, nranks, s);
      return;
    }
    case kind::fp16:
    case kind::bf16: {
      const half_format f = m.what == kind::fp16 ? half_format::fp16 : half_format::bf16;
      auto* h = reinterpret_cast<std::uint16_t*>(m.reserve(2 * n, s));
      half_ef_encode(f, grads, residual, n, h, s);
      RF_NCCL(ncclAllReduce(h, h, n, f == half_format::fp16 ? ncclFloat16 : ncclBfloat16, ncclSum,
                            comm, s));
      half_decode(f, h, n, grads, nranks, s);
      return;
    }
    case kind::int8: {
      if (nranks > 127) {
        throw not_supported_error(fmt::format(
            "int8 compressor on rank {}: {} ranks leave no int8 levels (L = floor(127 / ranks) = "
            "0); use bf16 or topk beyond 127 ranks",
            rank, nranks));
      }
      const int levels = 127 / nranks;
      const std::size_t nb = block_count(n, m.block);
      unsigned char* ws = m.reserve(align256(4 * nb) + n, s);
      auto* scales = reinterpret_cast<float*>(ws);
      auto* q = reinterpret_cast<std::int8_t*>(ws + align256(4 * nb));
      // 1. One scale per block, the max over ranks of max |c|. Scales are
      //    non-negative (or NaN) floats, whose bit patterns order like their
      //    values with NaN on top: a uint32 max is the CPU's max_op exactly,
      //    NaN included (a float max in NCCL may drop NaN).
      int8_block_absmax(grads, residual, n, m.block, scales, s);
      RF_NCCL(ncclAllReduce(scales, scales, nb, ncclUint32, ncclMax, comm, s));
      // 2. Quantize to [-L, L] with this rank's random stream.
      const std::uint64_t key =
          compress::kernels::stream_key(m.seed, step, static_cast<std::uint64_t>(rank));
      int8_ef_quantize(grads, residual, n, m.block, scales, levels, key, q, s);
      // 3. Integer sum: |sum| <= nranks * L <= 127, exact in any order.
      RF_NCCL(ncclAllReduce(q, q, n, ncclInt8, ncclSum, comm, s));
      int8_decode(q, scales, n, m.block, levels, grads, nranks, s);
      return;
    }
    case kind::sign: {
      const std::size_t pb = sign_payload_bytes(n, m.block);  // a multiple of 4
      const std::size_t nb = block_count(n, m.block);
      unsigned char* all = m.reserve(ranks * pb, s);
      unsigned char* mine = all + static_cast<std::size_t>(rank) * pb;
      sign_ef_encode(grads, residual, n, m.block, reinterpret_cast<float*>(mine),
                     reinterpret_cast<std::uint32_t*>(mine + 4 * nb), s);
      RF_NCCL(ncclAllGather(mine, all, pb, ncclUint8, comm, s));  // in place
      sign_decode_sum(all, pb, nranks, n, m.block, grads, nranks, s);
      return;
    }
    case kind::topk: {
      const std::size_t k = dynamic_cast<const compress::topk_compressor&>(*m.cpu).k(n);
      const std::size_t pb = topk_payload_bytes(k);
      const std::size_t tw = topk_workspace_bytes(n, k);
      const std::size_t gathered = align256(ranks * pb);
      unsigned char* all = m.reserve(gathered + tw, s);
      unsigned char* mine = all + static_cast<std::size_t>(rank) * pb;
      const std::uint64_t key =
          compress::kernels::stream_key(m.seed, step, compress::kernels::topk_sample_stream);
      topk_ef_encode(grads, residual, n, k, key, reinterpret_cast<std::uint32_t*>(mine),
                     reinterpret_cast<float*>(mine + 4 * k), all + gathered, tw, s);
      RF_NCCL(ncclAllGather(mine, all, pb, ncclUint8, comm, s));  // in place
      // The CPU's order: zeros, then every rank's pairs added in rank order.
      RINGFLOW_CHECK_CUDA(cudaMemsetAsync(grads, 0, 4 * n, s));
      for (std::size_t r = 0; r < ranks; ++r) {
        const unsigned char* p = all + r * pb;
        topk_decode_add(reinterpret_cast<const std::uint32_t*>(p),
                        reinterpret_cast<const float*>(p + 4 * k), k, n, grads, s);
      }
      if (nranks > 1) finish(dtype::f32, op_kind::avg, grads, n, nranks, s);
      return;
    }
    case kind::powersgd: powersgd_allreduce(comm, rank, nranks, grads, n, m, residual, s); return;
  }
}

#undef RF_NCCL

}  // namespace ringflow::cuda

#endif  // RINGFLOW_HAS_NCCL
