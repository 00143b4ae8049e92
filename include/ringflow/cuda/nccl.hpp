// The NCCL backend: a communicator over NCCL built from a ringflow
// communicator (the ncclUniqueId travels over MPI), NCCL's collectives on
// device buffers, stream-ordered, a ring allreduce of our own over
// ncclSend/ncclRecv, and a ringflow transport over NCCL point-to-point.
//
// Needs NCCL: everything here exists only where RINGFLOW_HAS_NCCL is 1
// (ringflow::cuda built with nvcc and NCCL found); guard your includes and
// uses with `#if RINGFLOW_HAS_NCCL`. No fmt here: kernels may include it.
#pragma once

#if defined(RINGFLOW_HAS_NCCL) && RINGFLOW_HAS_NCCL

#include <cuda_runtime_api.h>
#include <nccl.h>

#include <cstddef>
#include <memory>
#include <span>
#include <string>
#include <type_traits>

#include "ringflow/coll/partition.hpp"
#include "ringflow/comm/communicator.hpp"
#include "ringflow/comm/transport.hpp"
#include "ringflow/core/dtype.hpp"
#include "ringflow/core/error.hpp"
#include "ringflow/core/reduce_op.hpp"

namespace ringflow::cuda {

/// A failed NCCL call. The message names the call, the rank
/// (cuda::error_rank()), NCCL's error string and NCCL's last error text.
/// A comm_error: NCCL failures are communication failures (a peer died, a
/// network error, an internal NCCL error), and usage mistakes NCCL detects
/// itself (ncclInvalidArgument, ncclInvalidUsage) come with NCCL's reason.
class nccl_error : public ringflow::comm_error {
 public:
  nccl_error(const std::string& what, ncclResult_t code) : comm_error(what), code_(code) {}
  ncclResult_t code() const noexcept { return code_; }

 private:
  ncclResult_t code_;
};

namespace detail {
/// "ncclInvalidArgument" for ncclInvalidArgument, and so on.
const char* nccl_result_name(ncclResult_t code) noexcept;
[[noreturn]] void throw_nccl_error(ncclResult_t code, const char* call, const char* file, int line);
/// For destructors: logs the failure instead of throwing.
void log_nccl_error(ncclResult_t code, const char* call, const char* file, int line) noexcept;
/// ringflow's dtype and op tags as NCCL's (avg -> ncclAvg; the collectives
/// below run avg as ncclSum and ringflow's own division instead).
ncclDataType_t nccl_type(dtype t);
ncclRedOp_t nccl_op(op_kind k);
struct nccl_state;
}  // namespace detail

}  // namespace ringflow::cuda

/// Throws ringflow::cuda::nccl_error if `call` does not return ncclSuccess:
/// "rank 3: ncclAllReduce(...) failed: <ncclGetErrorString>: <ncclGetLastError>
/// (ncclInvalidArgument) [file:line]".
#define RINGFLOW_CHECK_NCCL(call)                                                             \
  do {                                                                                        \
    const ncclResult_t rf_nccl_status_ = (call);                                              \
    if (rf_nccl_status_ != ncclSuccess)                                                       \
      ::ringflow::cuda::detail::throw_nccl_error(rf_nccl_status_, #call, __FILE__, __LINE__); \
  } while (0)

/// In destructors and other noexcept paths: logs a failure, never throws.
#define RINGFLOW_LOG_NCCL(call)                                                             \
  do {                                                                                      \
    const ncclResult_t rf_nccl_status_ = (call);                                            \
    if (rf_nccl_status_ != ncclSuccess)                                                     \
      ::ringflow::cuda::detail::log_nccl_error(rf_nccl_status_, #call, __FILE__, __LINE__); \
  } while (0)

namespace ringflow::cuda {

class nccl_transport;

/// Default segment of ring_allreduce over NCCL: one NCCL launch per segment
/// costs microseconds, so segments are larger than the CPU ring's 256 KiB.
inline constexpr std::size_t nccl_ring_segment_bytes = std::size_t{4} << 20;

/// How a nccl_communicator picks its GPU.
struct nccl_options {
  /// The GPU (CUDA device index as this process sees it); -1 picks the
  /// node-local rank modulo the number of visible GPUs, where the node-local
  /// rank is the rank's index among the ranks on its host.
  int device = -1;
};

/// An NCCL communicator over the same ranks as a ringflow communicator.
///
/// Construction is collective over `comm`: the ranks exchange their hosts and
/// GPUs (two ranks on one GPU throw usage_error on every rank, see below),
/// rank 0 makes an ncclUniqueId and broadcasts it over `comm`, and every rank
/// calls ncclCommInitRank with its rank in `comm`. The chosen GPU is made
/// current on the calling thread, and cuda::error_rank() becomes comm.rank().
///
/// NCCL refuses (or hangs on) two ranks of one communicator on the same GPU.
/// Where the ranks would share one, construction throws usage_error on every
/// rank naming the ranks and the GPU, before NCCL is touched: use the staged
/// MPI path for ranks that share a GPU.
///
/// The collectives take spans of device memory (on this communicator's GPU)
/// and a stream, and are stream-ordered: they queue work on the stream and
/// return without waiting for it. Every rank must call them in the same order,
/// with the same counts, type, op and root, as the CPU collectives; in
/// checked mode (the ringflow communicator's checked(), RINGFLOW_CHECK=1) the
/// ranks compare the same fingerprint the CPU collectives do, over the
/// ringflow communicator, before the NCCL call, so a mismatch throws
/// usage_error on every rank instead of hanging in NCCL. That exchange is
/// host-side MPI traffic; it never synchronizes the device.
///
/// Move-only. Destroying it calls ncclCommDestroy, or ncclCommAbort after a
/// failed or timed-out operation (or abort()).
///
/// @code
/// ringflow::cuda::nccl_communicator nccl(ringflow::mpi::world());
/// ringflow::cuda::device_buffer<float> g(n);   // on nccl.device()
/// ringflow::cuda::stream s;
/// nccl.allreduce(g.span(), ringflow::avg, s);
/// nccl.ring_allreduce(g.span(), ringflow::sum, s);   // ringflow's ring over NCCL p2p
/// s.synchronize();
/// @endcode
class nccl_communicator {
 public:
  explicit nccl_communicator(const communicator& comm, nccl_options opt = {});
  nccl_communicator(nccl_communicator&&) noexcept;
  nccl_communicator& operator=(nccl_communicator&&) noexcept;
  nccl_communicator(const nccl_communicator&) = delete;
  nccl_communicator& operator=(const nccl_communicator&) = delete;
  ~nccl_communicator();

  int rank() const noexcept;
  int size() const noexcept;
  /// The CUDA device this rank's NCCL communicator uses.
  int device() const noexcept;
  /// The NCCL handle, for calls ringflow does not wrap.
  ncclComm_t raw() const noexcept;
  /// The ringflow communicator this was built from (bootstrap and checked mode).
  const communicator& base() const noexcept;

  /// Aborts the NCCL communicator now (ncclCommAbort), and the channels of
  /// its transport if one is alive: pending operations are cancelled; later
  /// calls throw. For error paths.
  void abort() noexcept;

  // --- Collectives on device memory, queued on `stream` ---------------------

  /// Allreduce `in` into `out` (same size; may be the same span; partial
  /// overlap is an error). avg: ncclSum followed by ringflow's one division
  /// of the finished sum (cuda::finish; integers truncate toward zero), as on
  /// the CPU, not ncclAvg (which multiplies every input by 1/p first).
  template <element T, reduce_op Op = sum_op>
  void allreduce(std::span<const std::type_identity_t<T>> in, std::span<T> out, Op op,
                 cudaStream_t stream) const {
    (void)op;
    allreduce_bytes(in.data(), out.data(), in.size(), out.size(), dtype_of<T>, Op::kind, stream);
  }
  /// In-place allreduce.
  template <element T, reduce_op Op = sum_op>
  void allreduce(std::span<T> data, Op op, cudaStream_t stream) const {
    (void)op;
    allreduce_bytes(data.data(), data.data(), data.size(), data.size(), dtype_of<T>, Op::kind,
                    stream);
  }

  /// Reduce-scatter with ringflow's contract (coll/collectives.hpp): `in`
  /// holds `count` elements on every rank; rank r receives the reduction of
  /// piece r = partition(count, size, r) in `out`, whose size must be that
  /// piece's. `out` may alias that piece of `in`. Any count: when size()
  /// divides it this is one ncclReduceScatter, otherwise one ncclReduce per
  /// piece in a group.
  template <element T, reduce_op Op = sum_op>
  void reduce_scatter(std::span<const std::type_identity_t<T>> in, std::span<T> out, Op op,
                      cudaStream_t stream) const {
    (void)op;
    reduce_scatter_bytes(in.data(), out.data(), in.size(), out.size(), dtype_of<T>, Op::kind,
                         stream);
  }
  /// In-place reduce-scatter: the result is left in this rank's piece of
  /// `data`, which is returned.
  template <element T, reduce_op Op = sum_op>
  std::span<T> reduce_scatter(std::span<T> data, Op op, cudaStream_t stream) const {
    const chunk own = partition(data.size(), size(), rank());
    std::span<T> mine = data.subspan(own.offset, own.count);
    reduce_scatter<T, Op>(std::span<const T>(data), mine, op, stream);
    return mine;
  }

  /// Allgather with ringflow's contract: rank r contributes piece r
  /// (partition(out.size(), size, r)) in `in`; every rank receives all of
  /// `out`. `in` may alias its piece of `out`. Any count: ncclAllGather when
  /// size() divides it, otherwise one ncclBroadcast per piece in a group.
  template <element T>
  void allgather(std::span<const std::type_identity_t<T>> in, std::span<T> out,
                 cudaStream_t stream) const {
    allgather_bytes(in.data(), out.data(), in.size(), out.size(), dtype_of<T>, stream);
  }
  /// In-place allgather: each rank's piece is already in place in `data`.
  template <element T>
  void allgather(std::span<T> data, cudaStream_t stream) const {
    const chunk own = partition(data.size(), size(), rank());
    allgather<T>(std::span<const T>(data.subspan(own.offset, own.count)), data, stream);
  }

  /// Broadcast `data` from `root` to every rank (same size everywhere).
  template <element T>
  void broadcast(std::span<T> data, int root, cudaStream_t stream) const {
    broadcast_bytes(data.data(), data.data(), data.size(), data.size(), dtype_of<T>, root, stream);
  }
  /// Out-of-place broadcast: root's `in` lands in every rank's `out`. `in` is
  /// read on the root only (other ranks may pass an empty span).
  template <element T>
  void broadcast(std::span<const std::type_identity_t<T>> in, std::span<T> out, int root,
                 cudaStream_t stream) const {
    broadcast_bytes(in.data(), out.data(), in.size(), out.size(), dtype_of<T>, root, stream);
  }

  // --- The rest of ringflow's collective set, on device memory ---------------
  //
  // The same contracts as the CPU collectives (coll/collectives.hpp: sizes,
  // roots, what may alias what), queued on `stream`.
  // Counts and displacements are host arrays. NCCL has no message envelope:
  // where only one side of a transfer knows its size (alltoallv, gatherv,
  // scatterv) the ranks must agree, and in checked mode (RINGFLOW_CHECK=1)
  // they compare those sizes over the ringflow communicator first (one small
  // host alltoall), so a disagreement throws usage_error on every rank,
  // naming the two ranks, instead of hanging in NCCL.

  /// Reduce to `root`: ncclReduce; avg is ncclSum and then ringflow's one
  /// division on the root, as in allreduce. `out` (root only; same size as
  /// `in` there, may be `in`) is not touched elsewhere and may be empty.
  template <element T, reduce_op Op = sum_op>
  void reduce(std::span<const std::type_identity_t<T>> in, std::span<T> out, Op op, int root,
              cudaStream_t stream) const {
    (void)op;
    reduce_bytes(in.data(), out.data(), in.size(), out.size(), dtype_of<T>, Op::kind, root, stream);
  }
  /// In-place reduce: `data` holds the result on `root`.
  template <element T, reduce_op Op = sum_op>
  void reduce(std::span<T> data, Op op, int root, cudaStream_t stream) const {
    reduce<T, Op>(std::span<const T>(data), data, op, root, stream);
  }

  /// Alltoall: `in` holds size() blocks of in.size() / size() elements, block
  /// q for rank q; `out` (same size, not overlapping) receives rank q's block
  /// for this rank as its block q. One group of ncclSend/ncclRecv (this
  /// rank's own block: a device copy).
  template <element T>
  void alltoall(std::span<const std::type_identity_t<T>> in, std::span<T> out,
                cudaStream_t stream) const {
    alltoall_bytes(in.data(), in.size(), out.data(), out.size(), dtype_of<T>, stream);
  }
  /// Alltoallv: send_counts[q] elements at in + send_displs[q] go to rank q,
  /// recv_counts[q] from rank q land at out + recv_displs[q].
  template <element T>
  void alltoallv(std::span<const std::type_identity_t<T>> in,
                 std::span<const std::size_t> send_counts, std::span<const std::size_t> send_displs,
                 std::span<T> out, std::span<const std::size_t> recv_counts,
                 std::span<const std::size_t> recv_displs, cudaStream_t stream) const {
    alltoallv_bytes(in.data(), in.size(), send_counts, send_displs, out.data(), out.size(),
                    recv_counts, recv_displs, dtype_of<T>, stream);
  }

  /// Gather: every rank's `in` (the same size everywhere) lands on `root` as
  /// block q of `out` (size() * in.size() elements, read on the root only).
  template <element T>
  void gather(std::span<const std::type_identity_t<T>> in, std::span<T> out, int root,
              cudaStream_t stream) const {
    gather_bytes(in.data(), in.size(), out.data(), out.size(), {}, {}, root, dtype_of<T>, stream);
  }
  /// Gatherv: rank q's `in` lands at out + displs[q] on `root`, which expects
  /// counts[q] elements from it (counts, displs and out: root only).
  template <element T>
  void gatherv(std::span<const std::type_identity_t<T>> in, std::span<T> out,
               std::span<const std::size_t> counts, std::span<const std::size_t> displs, int root,
               cudaStream_t stream) const {
    gather_bytes(in.data(), in.size(), out.data(), out.size(), counts, displs, root, dtype_of<T>,
                 stream, true);
  }

  /// Scatter: block q of `in` on `root` (size() * out.size() elements, read on
  /// the root only) goes to rank q's `out` (the same size everywhere).
  template <element T>
  void scatter(std::span<const std::type_identity_t<T>> in, std::span<T> out, int root,
               cudaStream_t stream) const {
    scatter_bytes(in.data(), in.size(), {}, {}, out.data(), out.size(), root, dtype_of<T>, stream);
  }
  /// Scatterv: counts[q] elements at in + displs[q] on `root` go to rank q's
  /// `out`, whose size must match (counts, displs and in: root only).
  template <element T>
  void scatterv(std::span<const std::type_identity_t<T>> in, std::span<const std::size_t> counts,
                std::span<const std::size_t> displs, std::span<T> out, int root,
                cudaStream_t stream) const {
    scatter_bytes(in.data(), in.size(), counts, displs, out.data(), out.size(), root, dtype_of<T>,
                  stream, true);
  }

  /// Allgatherv: rank q contributes counts[q] elements and every rank
  /// receives them at out + displs[q]; counts the same on every rank. One
  /// ncclBroadcast per rank in a group. `in` may be this rank's block of `out`.
  template <element T>
  void allgatherv(std::span<const std::type_identity_t<T>> in, std::span<T> out,
                  std::span<const std::size_t> counts, std::span<const std::size_t> displs,
                  cudaStream_t stream) const {
    allgatherv_bytes(in.data(), in.size(), out.data(), out.size(), counts, displs, dtype_of<T>,
                     stream);
  }

  /// Reduce-scatter with uneven pieces: `in` holds sum(counts) elements, piece
  /// q being counts[q] elements at the prefix sum before it; rank r receives
  /// the reduction of piece r in `out` (may be that piece of `in`). One
  /// ncclReduce per piece in a group; avg divides after, as in allreduce.
  template <element T, reduce_op Op = sum_op>
  void reduce_scatter_v(std::span<const std::type_identity_t<T>> in, std::span<T> out,
                        std::span<const std::size_t> counts, Op op, cudaStream_t stream) const {
    (void)op;
    reduce_scatter_v_bytes(in.data(), in.size(), out.data(), out.size(), counts, dtype_of<T>,
                           Op::kind, stream);
  }

  /// ringflow's own ring allreduce over NCCL point-to-point, with the same
  /// algorithm code as the CPU transports: the schedule of coll/ring.hpp
  /// (ring_allreduce_on) with the device-direct memory policy of
  /// cuda/ring.hpp, over this communicator's nccl_transport. Chunk c is
  /// combined in the same rank order with the same reduce_op functors (as
  /// device kernels), so the result equals ringflow::allreduce with
  /// algo::ring on host memory bit for bit, whatever the segment size.
  /// Collective (the first call also builds the transport). Waits for the
  /// work queued on `stream` before reading `in`, and returns once the result
  /// is in `out`. `segment_bytes`: 0 = nccl_ring_segment_bytes.
  template <element T, reduce_op Op = sum_op>
  void ring_allreduce(std::span<const std::type_identity_t<T>> in, std::span<T> out, Op op,
                      cudaStream_t stream, std::size_t segment_bytes = 0) const {
    (void)op;
    ring_allreduce_bytes(in.data(), out.data(), in.size(), out.size(), dtype_of<T>, Op::kind,
                         stream, segment_bytes);
  }
  template <element T, reduce_op Op = sum_op>
  void ring_allreduce(std::span<T> data, Op op, cudaStream_t stream,
                      std::size_t segment_bytes = 0) const {
    (void)op;
    ring_allreduce_bytes(data.data(), data.data(), data.size(), data.size(), dtype_of<T>, Op::kind,
                         stream, segment_bytes);
  }

  /// The same ring, same bits, but queued on `stream` with no host
  /// synchronization: each ring step is one NCCL group {send right, receive
  /// left} of a whole chunk followed by a reduction kernel (cuda::reduce, the
  /// CPU's functors), and staging memory is stream-ordered (cudaMallocAsync).
  /// Returns at once; the result is in `out` when `stream` gets there.
  template <element T, reduce_op Op = sum_op>
  void stream_ring_allreduce(std::span<const std::type_identity_t<T>> in, std::span<T> out, Op op,
                             cudaStream_t stream) const {
    (void)op;
    stream_ring_allreduce_bytes(in.data(), out.data(), in.size(), out.size(), dtype_of<T>, Op::kind,
                                stream);
  }
  template <element T, reduce_op Op = sum_op>
  void stream_ring_allreduce(std::span<T> data, Op op, cudaStream_t stream) const {
    (void)op;
    stream_ring_allreduce_bytes(data.data(), data.data(), data.size(), data.size(), dtype_of<T>,
                                Op::kind, stream);
  }

  /// A ringflow transport over ncclSend/ncclRecv on this communicator (see
  /// nccl_transport). Made on first use, which is collective (it builds and
  /// connects the transport's channel communicators); later calls return the
  /// same transport. The communicator keeps it; it keeps the NCCL handles
  /// alive while someone else still holds it.
  std::shared_ptr<nccl_transport> transport() const;

 private:
  void allreduce_bytes(const void* in, void* out, std::size_t in_count, std::size_t out_count,
                       dtype type, op_kind op, cudaStream_t stream) const;
  void reduce_scatter_bytes(const void* in, void* out, std::size_t in_count, std::size_t out_count,
                            dtype type, op_kind op, cudaStream_t stream) const;
  void allgather_bytes(const void* in, void* out, std::size_t in_count, std::size_t out_count,
                       dtype type, cudaStream_t stream) const;
  void broadcast_bytes(const void* in, void* out, std::size_t in_count, std::size_t out_count,
                       dtype type, int root, cudaStream_t stream) const;
  void reduce_bytes(const void* in, void* out, std::size_t in_count, std::size_t out_count,
                    dtype type, op_kind op, int root, cudaStream_t stream) const;
  void alltoall_bytes(const void* in, std::size_t in_count, void* out, std::size_t out_count,
                      dtype type, cudaStream_t stream) const;
  void alltoallv_bytes(const void* in, std::size_t in_count,
                       std::span<const std::size_t> send_counts,
                       std::span<const std::size_t> send_displs, void* out, std::size_t out_count,
                       std::span<const std::size_t> recv_counts,
                       std::span<const std::size_t> recv_displs, dtype type,
                       cudaStream_t stream) const;
  void gather_bytes(const void* in, std::size_t in_count, void* out, std::size_t out_count,
                    std::span<const std::size_t> counts, std::span<const std::size_t> displs,
                    int root, dtype type, cudaStream_t stream, bool v = false) const;
  void scatter_bytes(const void* in, std::size_t in_count, std::span<const std::size_t> counts,
                     std::span<const std::size_t> displs, void* out, std::size_t out_count,
                     int root, dtype type, cudaStream_t stream, bool v = false) const;
  void allgatherv_bytes(const void* in, std::size_t in_count, void* out, std::size_t out_count,
                        std::span<const std::size_t> counts, std::span<const std::size_t> displs,
                        dtype type, cudaStream_t stream) const;
  void reduce_scatter_v_bytes(const void* in, std::size_t in_count, void* out,
                              std::size_t out_count, std::span<const std::size_t> counts,
                              dtype type, op_kind op, cudaStream_t stream) const;
  void ring_allreduce_bytes(const void* in, void* out, std::size_t in_count, std::size_t out_count,
                            dtype type, op_kind op, cudaStream_t stream,
                            std::size_t segment_bytes) const;
  void stream_ring_allreduce_bytes(const void* in, void* out, std::size_t in_count,
                                   std::size_t out_count, dtype type, op_kind op,
                                   cudaStream_t stream) const;

  std::shared_ptr<detail::nccl_state> state_;
};

/// A ringflow transport over NCCL point-to-point on device memory.
///
/// NCCL runs the operations of one communicator one after another on the
/// GPU, each complete only once its peer's matching one runs; so a ring in
/// which every rank posts a send before its receive (ringflow's ring does)
/// would wait forever on one communicator. This transport therefore carries
/// the ring's traffic on channels: at construction (collective) it makes two
/// duplicates of the communicator (three for an odd rank count) and
/// connects them, such that a rank's sends to its right neighbour and its
/// receives from its left one travel on two different communicators and
/// each channel carries one direction between one pair. Those operations
/// are launched at isend/irecv, sends on one internal stream and receives on
/// another; posting order is matching order, as with MPI, and nothing waits
/// behind anything else (this needs NCCL to run kernels of different
/// communicators concurrently, its default: with NCCL_LAUNCH_ORDER_IMPLICIT=1
/// the constructor throws usage_error on every rank). Operations with any other peer (and
/// everything at one rank) are queued instead, and the first test() or wait() of a queued request
/// (or flush()) launches them all as one NCCL group, which NCCL progresses together: an algorithm
/// that posts a step's sends and receives and then waits cannot deadlock, whichever it posts first.
///
/// Each launch records a CUDA event; test() queries it, wait() polls it (and
/// NCCL's asynchronous error state) until the transport's timeout, then
/// throws timeout_error naming the peer, and the communicator is aborted at
/// destruction. NCCL has no message envelope: tags are not matched
/// (messages between two ranks are matched in posting order) and sizes are
/// not checked, so the ranks must agree on both. Pointers must be device
/// memory on the communicator's GPU. A send reads its buffer some time after
/// isend: work that produces it must be ordered before, either by the caller
/// (an event it waited for) or with order_after(stream), which makes every
/// later launch wait, on the device, for the work queued on that stream.
class nccl_transport final : public ringflow::transport {
 public:
  /// Over an existing communicator's state (nccl_communicator::transport()).
  /// Collective over that communicator.
  explicit nccl_transport(std::shared_ptr<detail::nccl_state> state);
  ~nccl_transport() override;

  int rank() const noexcept override;
  int size() const noexcept override;
  std::string_view name() const noexcept override { return "nccl"; }
  request isend(const void* data, std::size_t bytes, int peer, int tag) override;
  request irecv(void* data, std::size_t bytes, int peer, int tag) override;
  /// Collective: ncclCommSplit. A negative color takes no part (nullptr).
  std::shared_ptr<ringflow::transport> split(int color, int key) override;
  /// One NCCL communicator must not be used by two threads at once.
  bool concurrent_use_ok() const noexcept override { return false; }

  /// Launches every queued operation now, as one NCCL group.
  void flush();
  /// Every later launch first waits (on the device) for the work queued on
  /// `s` up to that launch; nullptr clears it.
  void order_after(cudaStream_t s) noexcept;
  cudaStream_t send_stream() const noexcept;
  cudaStream_t recv_stream() const noexcept;
  ncclComm_t raw() const noexcept;

  struct impl;

 private:
  friend class nccl_communicator;
  request post(bool is_send, void* data, std::size_t bytes, int peer, int tag);
  /// ncclCommAbort on the channels (nccl_communicator::abort()).
  void abort_channels() noexcept;
  std::shared_ptr<impl> impl_;
};

}  // namespace ringflow::cuda

#endif  // RINGFLOW_HAS_NCCL
