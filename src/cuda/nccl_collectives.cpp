// The NCCL backend (ringflow/cuda/nccl.hpp), part 3 of 4: NCCL's
// collectives on device buffers, and our ring over ncclSend/ncclRecv (the
// CPU ring's schedule, coll/extension.hpp). Host code, so it may format and
// log; the reduction kernels it queues are cuda::reduce / cuda::finish
// (src/cuda/reduce.cu).
#include "nccl_internal.hpp"

#if RINGFLOW_HAS_NCCL

namespace ringflow::cuda {

// --- Collectives ----------------------------------------------------------------

namespace {
/// ringflow::partition's pieces of `count` over p ranks, as counts and offsets.
std::pair<std::vector<std::size_t>, std::vector<std::size_t>> partition_pieces(std::size_t count,
                                                                               int p) {
  std::vector<std::size_t> counts(static_cast<std::size_t>(p)), offsets(counts.size());
  for (int c = 0; c < p; ++c) {
    const chunk piece = partition(count, p, c);
    counts[static_cast<std::size_t>(c)] = piece.count;
    offsets[static_cast<std::size_t>(c)] = piece.offset;
  }
  return {std::move(counts), std::move(offsets)};
}

/// The checks and checked-mode fingerprint every allreduce starts with
/// (NCCL's and both rings). False when there is nothing to reduce.
bool begin_allreduce(const nccl_state& st, const char* what, const void* in, const void* out,
                     std::size_t in_count, std::size_t out_count, dtype type, op_kind op) {
  if (in_count != out_count) {
    throw usage_error(fmt::format("nccl {} on rank {}: input has {} elements, output {}", what,
                                  st.rank, in_count, out_count));
  }
  const std::size_t esz = dtype_size(type);
  if (in != out && detail::overlaps(in, in_count * esz, out, out_count * esz)) {
    throw usage_error(
        fmt::format("nccl {} on rank {}: input and output overlap without being the same buffer",
                    what, st.rank));
  }
  require_device(st, what, "input", in, in_count);
  require_device(st, what, "output", out, out_count);
  ext::begin_queued_collective(st.base, coll_kind::allreduce, type, op, in_count);
  return in_count != 0;
}
}  // namespace

void nccl_communicator::allreduce_bytes(const void* in, void* out, std::size_t in_count,
                                        std::size_t out_count, dtype type, op_kind op,
                                        cudaStream_t stream) const {
  const nccl_state& st = usable(state_, "allreduce");
  if (!begin_allreduce(st, "allreduce", in, out, in_count, out_count, type, op)) return;
  device_guard dg(st.device);
  guarded(st, [&] {
    RINGFLOW_CHECK_NCCL(
        ncclAllReduce(in, out, in_count, detail::nccl_type(type), op_for(op), st.comm, stream));
    finish_avg(type, op, out, out_count, st.size, stream);
  });
}

void nccl_communicator::reduce_scatter_bytes(const void* in, void* out, std::size_t in_count,
                                             std::size_t out_count, dtype type, op_kind op,
                                             cudaStream_t stream) const {
  const nccl_state& st = usable(state_, "reduce_scatter");
  const int p = st.size, r = st.rank;
  const chunk own = partition(in_count, p, r);
  if (out_count != own.count) {
    throw usage_error(fmt::format(
        "nccl reduce_scatter on rank {}: output has {} elements but piece {} of {} elements over "
        "{} ranks has {} (see ringflow::partition)",
        r, out_count, r, in_count, p, own.count));
  }
  const std::size_t esz = dtype_size(type);
  if (detail::overlaps(in, in_count * esz, out, out_count * esz) &&
      out != at(in, own.offset, esz)) {
    throw usage_error(fmt::format(
        "nccl reduce_scatter on rank {}: the output overlaps the input without being exactly "
        "this rank's piece of it",
        r));
  }
  require_device(st, "reduce_scatter", "input", in, in_count);
  require_device(st, "reduce_scatter", "output", out, out_count);
  ext::begin_queued_collective(st.base, coll_kind::reduce_scatter, type, op, in_count);
  if (in_count == 0) return;
  device_guard dg(st.device);
  const ncclDataType_t nt = detail::nccl_type(type);
  const ncclRedOp_t nop = op_for(op);
  guarded(st, [&] {
    if (in_count % static_cast<std::size_t>(p) == 0) {
      RINGFLOW_CHECK_NCCL(ncclReduceScatter(in, out, in_count / static_cast<std::size_t>(p), nt,
                                            nop, st.comm, stream));
    } else {
      // Unequal pieces: one ncclReduce per piece, in one group (NCCL runs
      // them together).
      const auto [counts, offsets] = partition_pieces(in_count, p);
      detail::grouped_reduce_pieces(st, in, out, {counts, offsets}, type, op, stream);
    }
    finish_avg(type, op, out, out_count, p, stream);
  });
}

void nccl_communicator::allgather_bytes(const void* in, void* out, std::size_t in_count,
                                        std::size_t out_count, dtype type,
                                        cudaStream_t stream) const {
  const nccl_state& st = usable(state_, "allgather");
  const int p = st.size, r = st.rank;
  const chunk own = partition(out_count, p, r);
  if (in_count != own.count) {
    throw usage_error(fmt::format(
        "nccl allgather on rank {}: input has {} elements but piece {} of {} elements over {} "
        "ranks has {} (see ringflow::partition)",
        r, in_count, r, out_count, p, own.count));
  }
  const std::size_t esz = dtype_size(type);
  if (detail::overlaps(in, in_count * esz, out, out_count * esz) &&
      in != at(out, own.offset, esz)) {
    throw usage_error(fmt::format(
        "nccl allgather on rank {}: the input overlaps the output without being exactly this "
        "rank's piece of it",
        r));
  }
  require_device(st, "allgather", "input", in, in_count);
  require_device(st, "allgather", "output", out, out_count);
  ext::begin_queued_collective(st.base, coll_kind::allgather, type, op_kind::sum, out_count);
  if (out_count == 0) return;
  device_guard dg(st.device);
  const ncclDataType_t nt = detail::nccl_type(type);
  guarded(st, [&] {
    if (out_count % static_cast<std::size_t>(p) == 0) {
      RINGFLOW_CHECK_NCCL(
          ncclAllGather(in, out, out_count / static_cast<std::size_t>(p), nt, st.comm, stream));
    } else {
      // Unequal pieces: every rank broadcasts its piece, all in one group.
      const auto [counts, offsets] = partition_pieces(out_count, p);
      detail::grouped_broadcast_pieces(st, in, out, {counts, offsets}, type, stream);
    }
  });
}

void nccl_communicator::broadcast_bytes(const void* in, void* out, std::size_t in_count,
                                        std::size_t out_count, dtype type, int root,
                                        cudaStream_t stream) const {
  const nccl_state& st = usable(state_, "broadcast");
  const int r = st.rank;
  if (root < 0 || root >= st.size) {
    throw usage_error(
        fmt::format("nccl broadcast on rank {}: root {} is outside [0, {})", r, root, st.size));
  }
  const bool need_in = r == root || in_count != 0;
  if (need_in && in_count != out_count) {
    throw usage_error(fmt::format("nccl broadcast on rank {}: input has {} elements, output {}{}",
                                  r, in_count, out_count,
                                  r == root ? " (the root's input is what is sent)" : ""));
  }
  const std::size_t esz = dtype_size(type);
  if (in != out && detail::overlaps(in, in_count * esz, out, out_count * esz)) {
    throw usage_error(fmt::format(
        "nccl broadcast on rank {}: input and output overlap without being the same buffer", r));
  }
  if (r == root) require_device(st, "broadcast", "input", in, in_count);
  require_device(st, "broadcast", "output", out, out_count);
  ext::begin_queued_collective(st.base, coll_kind::broadcast, type, op_kind::sum, out_count, root);
  if (out_count == 0) return;
  device_guard dg(st.device);
  guarded(st, [&] {
    RINGFLOW_CHECK_NCCL(ncclBroadcast(r == root ? in : out, out, out_count, detail::nccl_type(type),
                                      root, st.comm, stream));
  });
}

namespace detail {

void grouped_reduce_pieces(const nccl_state& st, const void* in, void* out, pieces ps, dtype type,
                           op_kind op, cudaStream_t stream) {
  const std::size_t esz = dtype_size(type);
  const ncclDataType_t nt = nccl_type(type);
  const ncclRedOp_t nop = op_for(op);
  nccl_group g;
  for (int c = 0; c < st.size; ++c) {
    const auto q = static_cast<std::size_t>(c);
    if (ps.counts[q] == 0) continue;
    const void* send = at(in, ps.offsets[q], esz);
    void* recv = c == st.rank ? out : const_cast<void*>(send);
    RINGFLOW_CHECK_NCCL(ncclReduce(send, recv, ps.counts[q], nt, nop, c, st.comm, stream));
  }
  g.end();
}

void grouped_broadcast_pieces(const nccl_state& st, const void* in, void* out, pieces ps,
                              dtype type, cudaStream_t stream) {
  const std::size_t esz = dtype_size(type);
  const ncclDataType_t nt = nccl_type(type);
  nccl_group g;
  for (int c = 0; c < st.size; ++c) {
    const auto q = static_cast<std::size_t>(c);
    if (ps.counts[q] == 0) continue;
    void* recv = at(out, ps.offsets[q], esz);
    const void* send = c == st.rank ? in : recv;
    RINGFLOW_CHECK_NCCL(ncclBroadcast(send, recv, ps.counts[q], nt, c, st.comm, stream));
  }
  g.end();
}

}  // namespace detail

// --- Our ring over ncclSend/ncclRecv -------------------------------------------

void nccl_communicator::ring_allreduce_bytes(const void* in, void* out, std::size_t in_count,
                                             std::size_t out_count, dtype type, op_kind op,
                                             cudaStream_t stream, std::size_t segment_bytes) const {
  const nccl_state& st = usable(state_, "ring_allreduce");
  if (!begin_allreduce(st, "ring_allreduce", in, out, in_count, out_count, type, op)) return;
  device_guard dg(st.device);
  const std::size_t seg = segment_bytes != 0 ? segment_bytes : nccl_ring_segment_bytes;
  std::shared_ptr<nccl_transport> t = transport();
  // coll/ring.hpp's schedule, the CPU's very code, with device memory
  // handed straight to the NCCL transport (cuda/ring.hpp, direct mode).
  guarded(st, [&] {
    visit_dtype_op(type, op, [&]<class T, class Op>(type_tag<T>, Op) {
      device_ring_memory m(*t, ring_memory_mode::direct, seg, stream);
      ext::ring_allreduce(m, *t, static_cast<const T*>(in), static_cast<T*>(out), in_count, Op{},
                          seg);
    });
  });
}

void nccl_communicator::stream_ring_allreduce_bytes(const void* in, void* out, std::size_t in_count,
                                                    std::size_t out_count, dtype type, op_kind op,
                                                    cudaStream_t stream) const {
  const nccl_state& st = usable(state_, "stream_ring_allreduce");
  if (!begin_allreduce(st, "stream_ring_allreduce", in, out, in_count, out_count, type, op)) {
    return;
  }
  const std::size_t esz = dtype_size(type);
  const std::size_t count = in_count;
  device_guard dg(st.device);
  const int p = st.size, r = st.rank;
  if (p == 1) {
    // single_rank_result(): the input, copied unless in place, finished.
    if (out != in) {
      RINGFLOW_CHECK_CUDA(cudaMemcpyAsync(out, in, count * esz, cudaMemcpyDeviceToDevice, stream));
    }
    cuda::finish(type, op, out, count, 1, stream);
    return;
  }
  // coll/ring.hpp's schedule, one whole chunk per step (NCCL pipelines
  // inside a message, so ringflow's segments would only add launches):
  // reduce-scatter step s sends chunk r-s-1 (from the input at s = 0, else
  // the partial this rank made at step s-1) and receives chunk r-s-2, which
  // is combined as op(mine, received), exactly as reduce_inplace does; the
  // last step's chunk is r, finished in place. Allgather step s forwards
  // chunk r-s and receives chunk r-s-1 straight into `out`.
  const int left = ext::ring_mod(r - 1, p);
  const int right = ext::ring_mod(r + 1, p);
  const std::size_t staging_bytes = partition(count, p, 0).count * esz;  // the largest piece
  guarded(st, [&] {
    void* staging = nullptr;
    RINGFLOW_CHECK_CUDA(cudaMallocAsync(&staging, staging_bytes, stream));
    struct free_on_exit {
      void* p;
      cudaStream_t s;
      ~free_on_exit() { RINGFLOW_LOG_CUDA(cudaFreeAsync(p, s)); }
    } release{staging, stream};
    auto exchange = [&](const void* send, std::size_t send_n, void* recv, std::size_t recv_n) {
      nccl_group g;
      if (send_n)
        RINGFLOW_CHECK_NCCL(ncclSend(send, send_n * esz, ncclUint8, right, st.comm, stream));
      if (recv_n)
        RINGFLOW_CHECK_NCCL(ncclRecv(recv, recv_n * esz, ncclUint8, left, st.comm, stream));
      g.end();
    };
    for (int s = 0; s < p - 1; ++s) {
      const chunk sc = partition(count, p, ext::ring_mod(r - s - 1, p));
      const chunk rc = partition(count, p, ext::ring_mod(r - s - 2, p));
      exchange(s == 0 ? at(in, sc.offset, esz) : at(static_cast<const void*>(out), sc.offset, esz),
               sc.count, staging, rc.count);
      if (rc.count == 0) continue;
      void* dst = at(out, rc.offset, esz);
      cuda::reduce(type, op, dst, at(in, rc.offset, esz), staging, rc.count, stream);
      if (s == p - 2) cuda::finish(type, op, dst, rc.count, p, stream);
    }
    for (int s = 0; s < p - 1; ++s) {
      const chunk sc = partition(count, p, ext::ring_mod(r - s, p));
      const chunk rc = partition(count, p, ext::ring_mod(r - s - 1, p));
      exchange(at(static_cast<const void*>(out), sc.offset, esz), sc.count, at(out, rc.offset, esz),
               rc.count);
    }
  });
}

}  // namespace ringflow::cuda

#endif  // RINGFLOW_HAS_NCCL
