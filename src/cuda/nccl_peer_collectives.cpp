// The NCCL backend (ringflow/cuda/nccl.hpp), the rest of the collective set:
// reduce, alltoall(v), gather(v), scatter(v), allgatherv and reduce_scatter_v
// on device buffers, with the CPU collectives' argument checks
// (coll/collectives.hpp) and, in checked mode, a host-side comparison of the
// counts that only one side of a transfer knows (NCCL matches no envelope).
#include "nccl_internal.hpp"

#if RINGFLOW_HAS_NCCL

#include <numeric>

namespace ringflow::cuda {

namespace {

/// A device-to-device copy of `n` elements on `stream` (an alltoall's or a
/// gather's own block); nothing when empty or already in place.
void copy_block(void* dst, const void* src, std::size_t n, std::size_t esz, cudaStream_t stream) {
  if (n == 0 || dst == src) return;
  RINGFLOW_CHECK_CUDA(cudaMemcpyAsync(dst, src, n * esz, cudaMemcpyDeviceToDevice, stream));
}

/// Checked mode only: every rank tells rank q how many elements it sends it
/// (send_to[q]) and compares what it receives with what it expects from q
/// (expect_from[q]), over the ringflow communicator on the host. Throws
/// usage_error on every rank, naming the first pair that disagrees here, when
/// any rank found a disagreement: NCCL would otherwise wait forever or write
/// past a buffer.
void check_peer_counts(const nccl_state& st, const char* what,
                       const std::vector<std::int64_t>& send_to,
                       const std::vector<std::int64_t>& expect_from) {
  if (!st.base.checked() || st.size == 1) return;
  std::vector<std::int64_t> told(send_to.size());
  alltoall<std::int64_t>(st.base, std::span<const std::int64_t>(send_to),
                         std::span<std::int64_t>(told));
  std::string problem;
  for (std::size_t q = 0; q < told.size() && problem.empty(); ++q) {
    if (told[q] != expect_from[q]) {
      problem = fmt::format("rank {} sends {} elements to rank {}, which expects {}", q, told[q],
                            st.rank, expect_from[q]);
    }
  }
  std::int32_t bad = problem.empty() ? 0 : 1;
  allreduce(st.base, std::span<std::int32_t>(&bad, 1), max, coll_options{algo::ring, 0});
  if (bad != 0) {
    throw usage_error(fmt::format(
        "nccl {} on rank {}: the ranks disagree about the counts ({}); every receive count must "
        "equal its sender's send count",
        what, st.rank, problem.empty() ? "found on another rank" : problem));
  }
}

std::vector<std::int64_t> as_int64(std::span<const std::size_t> v) {
  std::vector<std::int64_t> out(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) out[i] = static_cast<std::int64_t>(v[i]);
  return out;
}

std::vector<std::size_t> equal_counts(int p, std::size_t n) {
  return std::vector<std::size_t>(static_cast<std::size_t>(p), n);
}

/// One rank's side of an alltoall(v): its own block as a device copy, the
/// others as one group of ncclSend/ncclRecv, empty blocks skipped.
void exchange_blocks(const nccl_state& st, const void* in, std::span<const std::size_t> send_counts,
                     std::span<const std::size_t> send_displs, void* out,
                     std::span<const std::size_t> recv_counts,
                     std::span<const std::size_t> recv_displs, dtype type, cudaStream_t stream) {
  const std::size_t esz = dtype_size(type);
  const ncclDataType_t nt = detail::nccl_type(type);
  const auto r = static_cast<std::size_t>(st.rank);
  copy_block(at(out, recv_displs[r], esz), at(in, send_displs[r], esz), send_counts[r], esz,
             stream);
  nccl_group g;
  for (int q = 0; q < st.size; ++q) {
    const auto k = static_cast<std::size_t>(q);
    if (k == r) continue;
    if (send_counts[k] > 0) {
      RINGFLOW_CHECK_NCCL(
          ncclSend(at(in, send_displs[k], esz), send_counts[k], nt, q, st.comm, stream));
    }
    if (recv_counts[k] > 0) {
      RINGFLOW_CHECK_NCCL(
          ncclRecv(at(out, recv_displs[k], esz), recv_counts[k], nt, q, st.comm, stream));
    }
  }
  g.end();
}

/// The root's layout of a gather (`role` "receive") or scatter ("send"):
/// the blocks of its buffer of `whole` elements, one per rank, checked like
/// the CPU collectives; `own` is the root's own block size ("input" for
/// gather, "output" for scatter).
struct root_layout {
  std::vector<std::size_t> counts, displs;
};
root_layout layout_on_root(const nccl_state& st, const char* what, bool v, const char* role,
                           std::span<const std::size_t> counts_in,
                           std::span<const std::size_t> displs_in, std::size_t whole,
                           std::size_t own, const char* whole_name, const char* own_name) {
  const auto p = static_cast<std::size_t>(st.size);
  const auto q_root = static_cast<std::size_t>(st.rank);
  const std::string name = fmt::format("nccl {}", what);
  root_layout l;
  if (v) {
    ringflow::detail::check_blocks(st.base, name.c_str(), role, counts_in, displs_in, whole);
    l.counts.assign(counts_in.begin(), counts_in.end());
    l.displs.assign(displs_in.begin(), displs_in.end());
  } else {
    if (whole != p * own) {
      throw usage_error(
          fmt::format("{} on rank {} (the root): {} has {} elements, need {} ranks x {}", name,
                      st.rank, whole_name, whole, p, own));
    }
    l.counts = equal_counts(st.size, own);
    l.displs = ringflow::detail::packed_displs(l.counts);
  }
  if (l.counts[q_root] != own) {
    throw usage_error(
        fmt::format("{} on rank {} (the root): {} has {} elements but counts[{}] is {}", name,
                    st.rank, own_name, own, st.rank, l.counts[q_root]));
  }
  return l;
}

}  // namespace

void nccl_communicator::reduce_bytes(const void* in, void* out, std::size_t in_count,
                                     std::size_t out_count, dtype type, op_kind op, int root,
                                     cudaStream_t stream) const {
  const nccl_state& st = usable(state_, "reduce");
  ringflow::detail::check_root(st.base, "nccl reduce", root);
  const bool is_root = st.rank == root;
  const std::size_t esz = dtype_size(type);
  if (is_root) {
    if (out_count != in_count) {
      throw usage_error(
          fmt::format("nccl reduce on rank {} (the root): input has {} elements, output {}", root,
                      in_count, out_count));
    }
    if (in != out && detail::overlaps(in, in_count * esz, out, out_count * esz)) {
      throw usage_error(fmt::format(
          "nccl reduce on rank {}: input and output overlap without being the same buffer", root));
    }
    require_device(st, "reduce", "output", out, out_count);
  }
  require_device(st, "reduce", "input", in, in_count);
  ext::begin_queued_collective(st.base, coll_kind::reduce, type, op, in_count, root);
  if (in_count == 0) return;
  device_guard dg(st.device);
  guarded(st, [&] {
    void* recv = is_root ? out : const_cast<void*>(in);  // read on the root only
    RINGFLOW_CHECK_NCCL(
        ncclReduce(in, recv, in_count, detail::nccl_type(type), op_for(op), root, st.comm, stream));
    if (is_root) finish_avg(type, op, out, out_count, st.size, stream);
  });
}

void nccl_communicator::alltoall_bytes(const void* in, std::size_t in_count, void* out,
                                       std::size_t out_count, dtype type,
                                       cudaStream_t stream) const {
  const nccl_state& st = usable(state_, "alltoall");
  const auto p = static_cast<std::size_t>(st.size);
  if (in_count % p != 0 || out_count != in_count) {
    throw usage_error(fmt::format(
        "nccl alltoall on rank {}: input ({} elements) and output ({}) must have the same size, a "
        "multiple of the {} ranks",
        st.rank, in_count, out_count, p));
  }
  const std::size_t esz = dtype_size(type);
  if (detail::overlaps(in, in_count * esz, out, out_count * esz)) {
    throw usage_error(fmt::format("nccl alltoall on rank {}: input and output overlap", st.rank));
  }
  require_device(st, "alltoall", "input", in, in_count);
  require_device(st, "alltoall", "output", out, out_count);
  const std::size_t block = in_count / p;
  ext::begin_queued_collective(st.base, coll_kind::alltoall, type, op_kind::sum, block);
  if (block == 0) return;
  const std::vector<std::size_t> counts = equal_counts(st.size, block);
  const std::vector<std::size_t> displs = ringflow::detail::packed_displs(counts);
  device_guard dg(st.device);
  guarded(st, [&] { exchange_blocks(st, in, counts, displs, out, counts, displs, type, stream); });
}

void nccl_communicator::alltoallv_bytes(const void* in, std::size_t in_count,
                                        std::span<const std::size_t> send_counts,
                                        std::span<const std::size_t> send_displs, void* out,
                                        std::size_t out_count,
                                        std::span<const std::size_t> recv_counts,
                                        std::span<const std::size_t> recv_displs, dtype type,
                                        cudaStream_t stream) const {
  const nccl_state& st = usable(state_, "alltoallv");
  ringflow::detail::check_blocks(st.base, "nccl alltoallv", "send", send_counts, send_displs,
                                 in_count);
  ringflow::detail::check_blocks(st.base, "nccl alltoallv", "receive", recv_counts, recv_displs,
                                 out_count);
  const auto r = static_cast<std::size_t>(st.rank);
  if (send_counts[r] != recv_counts[r]) {
    throw usage_error(fmt::format(
        "nccl alltoallv on rank {}: sends {} elements to itself but expects {} from itself", r,
        send_counts[r], recv_counts[r]));
  }
  const std::size_t esz = dtype_size(type);
  if (detail::overlaps(in, in_count * esz, out, out_count * esz)) {
    throw usage_error(fmt::format("nccl alltoallv on rank {}: input and output overlap", st.rank));
  }
  require_device(st, "alltoallv", "input", in, in_count);
  require_device(st, "alltoallv", "output", out, out_count);
  ext::begin_queued_collective(st.base, coll_kind::alltoallv, type, op_kind::sum, 0);
  check_peer_counts(st, "alltoallv", as_int64(send_counts), as_int64(recv_counts));
  device_guard dg(st.device);
  guarded(st, [&] {
    exchange_blocks(st, in, send_counts, send_displs, out, recv_counts, recv_displs, type, stream);
  });
}

void nccl_communicator::gather_bytes(const void* in, std::size_t in_count, void* out,
                                     std::size_t out_count, std::span<const std::size_t> counts_in,
                                     std::span<const std::size_t> displs_in, int root, dtype type,
                                     cudaStream_t stream, bool v) const {
  const char* what = v ? "gatherv" : "gather";
  const nccl_state& st = usable(state_, what);
  const std::string name = fmt::format("nccl {}", what);
  ringflow::detail::check_root(st.base, name.c_str(), root);
  const bool is_root = st.rank == root;
  const auto p = static_cast<std::size_t>(st.size);
  const auto q_root = static_cast<std::size_t>(root);
  const std::size_t esz = dtype_size(type);
  std::vector<std::size_t> counts, displs;  // root only
  if (is_root) {
    auto l = layout_on_root(st, what, v, "receive", counts_in, displs_in, out_count, in_count,
                            "output", "input");
    counts = std::move(l.counts);
    displs = std::move(l.displs);
    const void* own = at(out, displs[q_root], esz);
    if (in != own && detail::overlaps(in, in_count * esz, out, out_count * esz)) {
      throw usage_error(fmt::format("nccl {} on rank {}: input and output overlap", what, root));
    }
    require_device(st, what, "output", out, out_count);
  }
  require_device(st, what, "input", in, in_count);
  ext::begin_queued_collective(st.base, v ? coll_kind::gatherv : coll_kind::gather, type,
                               op_kind::sum, v ? 0 : in_count, root);
  if (v) {
    std::vector<std::int64_t> send_to(p, 0), expect_from(p, 0);
    send_to[q_root] = static_cast<std::int64_t>(in_count);
    if (is_root) expect_from = as_int64(counts);
    check_peer_counts(st, what, send_to, expect_from);
  }
  device_guard dg(st.device);
  const ncclDataType_t nt = detail::nccl_type(type);
  guarded(st, [&] {
    if (!is_root) {
      if (in_count > 0) RINGFLOW_CHECK_NCCL(ncclSend(in, in_count, nt, root, st.comm, stream));
      return;
    }
    copy_block(at(out, displs[q_root], esz), in, in_count, esz, stream);
    nccl_group g;
    for (std::size_t q = 0; q < p; ++q) {
      if (q == q_root || counts[q] == 0) continue;
      RINGFLOW_CHECK_NCCL(
          ncclRecv(at(out, displs[q], esz), counts[q], nt, static_cast<int>(q), st.comm, stream));
    }
    g.end();
  });
}

void nccl_communicator::scatter_bytes(const void* in, std::size_t in_count,
                                      std::span<const std::size_t> counts_in,
                                      std::span<const std::size_t> displs_in, void* out,
                                      std::size_t out_count, int root, dtype type,
                                      cudaStream_t stream, bool v) const {
  const char* what = v ? "scatterv" : "scatter";
  const nccl_state& st = usable(state_, what);
  const std::string name = fmt::format("nccl {}", what);
  ringflow::detail::check_root(st.base, name.c_str(), root);
  const bool is_root = st.rank == root;
  const auto p = static_cast<std::size_t>(st.size);
  const auto q_root = static_cast<std::size_t>(root);
  const std::size_t esz = dtype_size(type);
  std::vector<std::size_t> counts, displs;  // root only
  if (is_root) {
    auto l = layout_on_root(st, what, v, "send", counts_in, displs_in, in_count, out_count, "input",
                            "output");
    counts = std::move(l.counts);
    displs = std::move(l.displs);
    const void* own = at(in, displs[q_root], esz);
    if (out != own && detail::overlaps(in, in_count * esz, out, out_count * esz)) {
      throw usage_error(fmt::format("nccl {} on rank {}: input and output overlap", what, root));
    }
    require_device(st, what, "input", in, in_count);
  }
  require_device(st, what, "output", out, out_count);
  ext::begin_queued_collective(st.base, v ? coll_kind::scatterv : coll_kind::scatter, type,
                               op_kind::sum, v ? 0 : out_count, root);
  if (v) {
    std::vector<std::int64_t> send_to(p, 0), expect_from(p, 0);
    if (is_root) send_to = as_int64(counts);
    expect_from[q_root] = static_cast<std::int64_t>(out_count);
    check_peer_counts(st, what, send_to, expect_from);
  }
  device_guard dg(st.device);
  const ncclDataType_t nt = detail::nccl_type(type);
  guarded(st, [&] {
    if (!is_root) {
      if (out_count > 0) RINGFLOW_CHECK_NCCL(ncclRecv(out, out_count, nt, root, st.comm, stream));
      return;
    }
    copy_block(out, at(in, displs[q_root], esz), out_count, esz, stream);
    nccl_group g;
    for (std::size_t q = 0; q < p; ++q) {
      if (q == q_root || counts[q] == 0) continue;
      RINGFLOW_CHECK_NCCL(
          ncclSend(at(in, displs[q], esz), counts[q], nt, static_cast<int>(q), st.comm, stream));
    }
    g.end();
  });
}

void nccl_communicator::allgatherv_bytes(const void* in, std::size_t in_count, void* out,
                                         std::size_t out_count, std::span<const std::size_t> counts,
                                         std::span<const std::size_t> displs, dtype type,
                                         cudaStream_t stream) const {
  const nccl_state& st = usable(state_, "allgatherv");
  ringflow::detail::check_blocks(st.base, "nccl allgatherv", "receive", counts, displs, out_count);
  const auto r = static_cast<std::size_t>(st.rank);
  if (counts[r] != in_count) {
    throw usage_error(
        fmt::format("nccl allgatherv on rank {}: input has {} elements but counts[{}] is {}", r,
                    in_count, r, counts[r]));
  }
  const std::size_t esz = dtype_size(type);
  if (in != at(out, displs[r], esz) && detail::overlaps(in, in_count * esz, out, out_count * esz)) {
    throw usage_error(fmt::format("nccl allgatherv on rank {}: input and output overlap", r));
  }
  require_device(st, "allgatherv", "input", in, in_count);
  require_device(st, "allgatherv", "output", out, out_count);
  const std::size_t total = std::accumulate(counts.begin(), counts.end(), std::size_t{0});
  ext::begin_queued_collective(st.base, coll_kind::allgatherv, type, op_kind::sum, total,
                               ringflow::detail::counts_hash(counts));
  if (total == 0) return;
  device_guard dg(st.device);
  guarded(st, [&] {
    detail::grouped_broadcast_pieces(st, in, out, {counts, displs}, type, stream);
  });
}

void nccl_communicator::reduce_scatter_v_bytes(const void* in, std::size_t in_count, void* out,
                                               std::size_t out_count,
                                               std::span<const std::size_t> counts, dtype type,
                                               op_kind op, cudaStream_t stream) const {
  const nccl_state& st = usable(state_, "reduce_scatter_v");
  const auto p = static_cast<std::size_t>(st.size);
  const auto r = static_cast<std::size_t>(st.rank);
  if (counts.size() != p) {
    throw usage_error(fmt::format(
        "nccl reduce_scatter_v on rank {}: counts has {} entries, need one per rank ({})", r,
        counts.size(), p));
  }
  const std::vector<std::size_t> offsets = ringflow::detail::packed_displs(counts);
  const std::size_t total = std::accumulate(counts.begin(), counts.end(), std::size_t{0});
  if (in_count != total || out_count != counts[r]) {
    throw usage_error(fmt::format(
        "nccl reduce_scatter_v on rank {}: input has {} elements and output {}, but the counts "
        "add up to {} and counts[{}] is {}",
        r, in_count, out_count, total, r, counts[r]));
  }
  const std::size_t esz = dtype_size(type);
  if (out != at(in, offsets[r], esz) &&
      detail::overlaps(in, in_count * esz, out, out_count * esz)) {
    throw usage_error(fmt::format(
        "nccl reduce_scatter_v on rank {}: the output overlaps the input without being exactly "
        "this rank's piece of it",
        r));
  }
  require_device(st, "reduce_scatter_v", "input", in, in_count);
  require_device(st, "reduce_scatter_v", "output", out, out_count);
  ext::begin_queued_collective(st.base, coll_kind::reduce_scatter_v, type, op, total,
                               ringflow::detail::counts_hash(counts));
  if (total == 0) return;
  device_guard dg(st.device);
  guarded(st, [&] {
    detail::grouped_reduce_pieces(st, in, out, {counts, offsets}, type, op, stream);
    finish_avg(type, op, out, out_count, st.size, stream);
  });
}

}  // namespace ringflow::cuda

#endif  // RINGFLOW_HAS_NCCL
