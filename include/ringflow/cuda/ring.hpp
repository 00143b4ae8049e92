// The ring collectives on device memory: the schedule of coll/ring.hpp (the
// very code the CPU transports run) with a device memory policy, and the
// staged MPI path built on it.
//
// device_ring_memory is detail::staged_ring_memory (coll/ring_staging.hpp,
// where its logic lives and is tested on the CPU) over a CUDA stream.
//
// Two ways device segments reach a transport (device_ring_memory's mode):
//
//  - staged: the transport takes host memory (MPI that is not CUDA-aware, the
//    case where several ranks share one GPU). A segment to send is copied
//    device -> pinned host on the policy's stream, and its isend is posted
//    once that copy's event completes; a received segment lands in a pinned
//    slot, is copied host -> device and combined there by cuda::reduce (an
//    allgather segment is copied to its place in the output, and forwarded
//    by copying it off again). Copies of some segments overlap the transfers
//    of others: `slots` pinned receive slots and as many pinned send blocks
//    are in flight at once.
//    staged_allreduce / staged_reduce_scatter / staged_allgather below wrap it.
//
//  - direct ("device-direct"): the transport takes device pointers itself
//    (ncclSend/ncclRecv, CUDA-aware MPI). No copies: a received segment lands
//    in a device slot and the reduce kernel reads it there; allgather
//    receives land straight in the output.
//
// Running the ring over a transport of device pointers (for example the NCCL
// p2p transport): construct the policy in direct mode and call the *_on
// schedule of coll/ring.hpp with it:
//
//   cuda::device_ring_memory m(t, cuda::ring_memory_mode::direct, seg_bytes, stream);
//   detail::ring_allreduce_on(m, t, in, out, count, op, seg_bytes);  // returns when done
//
// What the policy needs from such a transport (and nothing else):
//   - irecv: may write the destination at any time from the post until the
//     request completes, and once it completes (test() true or wait()
//     returns) the bytes are in device memory and visible to work queued
//     afterwards on any stream. Complete means landed: the policy queues the
//     kernel that reads the bytes the moment test() says true, on its own
//     non-blocking stream, which orders after nothing of the transport's. An
//     event-backed request gives that (nccl_transport: an event recorded
//     after the ncclRecv); a transport that copies through host memory must
//     wait for its copy before it says complete (cudaMemcpy from pageable
//     memory returns before its DMA is done: on the H200 the ring then read
//     the slot's previous contents);
//   - isend: may read the device bytes at any time from the post until the
//     request completes. The policy posts a send only once the kernels that
//     wrote the segment are done (it waits for an event recorded after them,
//     polling, never blocking the host on the device), so the transport may
//     use any stream;
//   - requests poll with test() and honour the transport's timeout in wait().
// What the policy guarantees in return: it posts a receive only into memory
// that none of its queued work reads or writes (a slot again once the kernel
// that read it is done; allgather receives into chunks whose reduce-scatter
// kernels are done and whose sends have completed) and queues nothing on it
// until the receive completes; it writes nothing a send reads until the
// send completes. So the transport need not order its copies or kernels
// after the policy's stream. tests/support/staging_checks.hpp checks both
// sides without a GPU (device_pointer_like_transport).
// Kernels run on the policy's stream (`stream()`), which first waits for the
// work queued on the stream given to the constructor. The policy
// synchronizes its stream before the schedule returns.
//
// Needs the CUDA toolkit headers: include only where RINGFLOW_HAS_CUDA is 1.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <memory>
#include <span>
#include <type_traits>
#include <vector>

#include "ringflow/coll/ring.hpp"
#include "ringflow/comm/communicator.hpp"
#include "ringflow/comm/transport.hpp"
#include "ringflow/core/dtype.hpp"
#include "ringflow/core/reduce_op.hpp"

namespace ringflow::cuda {

/// Default segment of the staged path: large enough that per-copy and
/// per-message overheads are small next to PCIe and network bandwidth, small
/// enough that several segments are in flight for buffers of a few MiB.
inline constexpr std::size_t default_staged_segment_bytes = std::size_t{1} << 20;
/// Default pinned receive slots (and send blocks) of the staged path.
inline constexpr int default_staged_slots = 4;

struct staged_options {
  /// Bytes per pipelined segment (0 = default_staged_segment_bytes). Results
  /// are bit-identical to the CPU ring with the same segment size.
  std::size_t segment_bytes = 0;
  /// Pinned receive slots and send blocks (at least 2: one segment copies
  /// while another is on the wire).
  int slots = default_staged_slots;
  /// Work queued on this stream before the call is finished before the
  /// collective reads its input (nullptr = the legacy default stream). The
  /// call returns once the result is in `out`.
  cudaStream_t stream = nullptr;
};

enum class ring_memory_mode {
  staged,  ///< transport takes host memory: copies through pinned slots
  direct,  ///< transport takes device pointers: no copies
};

/// The device memory policy of the ring schedule in coll/ring.hpp (see the
/// file comment and detail::host_ring_memory for the interface). One object
/// serves one collective call on one transport.
class device_ring_memory {
 public:
  /// `segment_bytes`: the bytes of the call's largest segment, that is
  /// detail::segment_elems(seg, sizeof(T)) * sizeof(T) (sizes the staging
  /// blocks; direct mode allocates no blocks and ignores it); `after`:
  /// stream whose queued work the collective waits for first; `slots`:
  /// receives in flight and staged send blocks (>= 2).
  device_ring_memory(transport& t, ring_memory_mode mode, std::size_t segment_bytes,
                     cudaStream_t after = nullptr, int slots = default_staged_slots);
  ~device_ring_memory();
  device_ring_memory(const device_ring_memory&) = delete;
  device_ring_memory& operator=(const device_ring_memory&) = delete;

  /// The stream the policy's copies and kernels run on.
  cudaStream_t stream() const noexcept;

  // --- the memory policy interface used by coll/ring.hpp ---
  template <class T>
  void send(transport& /*t*/, const T* src, std::size_t n, int peer, int tag,
            std::vector<request>& sends) {
    send_bytes(src, n * sizeof(T), peer, tag, &sends);
  }
  void sources_read(std::vector<request>& sends);
  void complete(std::vector<request>& sends);

  std::size_t recv_depth() const noexcept;
  template <class T>
  void open_slots(std::size_t depth, std::size_t seg) {
    open_slots_bytes(depth, seg * sizeof(T));
  }
  template <class T>
  void post_recv(transport& /*t*/, std::size_t k, std::size_t n, int peer, int tag) {
    post_recv_bytes(k, n * sizeof(T), peer, tag);
  }
  template <class T, class Op>
  void reduce_received(std::size_t k, T* dst, const T* mine, std::size_t n, const Op& /*op*/) {
    reduce_received_elems(k, dtype_of<std::remove_cv_t<T>>, Op::kind, dst, mine, n);
  }
  template <class T, class Op>
  void finish(T* dst, std::size_t n, const Op& /*op*/, int p) {
    if constexpr (Op::kind == op_kind::avg) finish_elems(dtype_of<std::remove_cv_t<T>>, dst, n, p);
  }

  std::size_t gather_depth(std::size_t units);
  template <class T>
  void post_gather(transport& /*t*/, std::size_t k, T* dst, std::size_t n, int peer, int tag) {
    post_gather_bytes(k, dst, n * sizeof(T), peer, tag);
  }
  template <class T>
  void land(std::size_t k, T* dst, std::size_t n) {
    land_bytes(k, dst, n * sizeof(T));
  }
  template <class T>
  void forward(transport& /*t*/, std::size_t k, const T* dst, std::size_t n, int peer, int tag,
               std::vector<request>& sends) {
    forward_bytes(k, dst, n * sizeof(T), peer, tag, &sends);
  }
  template <class T>
  void copy(T* dst, const T* src, std::size_t n) {
    copy_bytes(dst, src, n * sizeof(T));
  }
  template <class T>
  T* partial(std::size_t count) {
    return static_cast<T*>(partial_bytes(count * sizeof(T)));
  }

 private:
  void send_bytes(const void* src, std::size_t bytes, int peer, int tag, const void* group);
  void open_slots_bytes(std::size_t depth, std::size_t slot_bytes);
  void post_recv_bytes(std::size_t k, std::size_t bytes, int peer, int tag);
  void reduce_received_elems(std::size_t k, dtype type, op_kind op, void* dst, const void* mine,
                             std::size_t n);
  void finish_elems(dtype type, void* dst, std::size_t n, int p);
  void post_gather_bytes(std::size_t k, void* dst, std::size_t bytes, int peer, int tag);
  void land_bytes(std::size_t k, void* dst, std::size_t bytes);
  void forward_bytes(std::size_t k, const void* dst, std::size_t bytes, int peer, int tag,
                     const void* group);
  void copy_bytes(void* dst, const void* src, std::size_t bytes);
  void* partial_bytes(std::size_t bytes);

  struct impl;
  std::unique_ptr<impl> impl_;
};

namespace detail {
// Type-erased staged collectives (src/cuda/ring.cpp): argument checks,
// checked-mode fingerprint, then the ring with a staged device_ring_memory.
void staged_allreduce(const communicator& comm, const void* in, void* out, std::size_t in_count,
                      std::size_t out_count, dtype type, op_kind op, const staged_options& opt);
void staged_reduce_scatter(const communicator& comm, const void* in, void* out,
                           std::size_t in_count, std::size_t out_count, dtype type, op_kind op,
                           const staged_options& opt);
void staged_allgather(const communicator& comm, const void* in, void* out, std::size_t in_count,
                      std::size_t out_count, dtype type, const staged_options& opt);
void staged_broadcast(const communicator& comm, void* data, std::size_t count, dtype type, int root,
                      const staged_options& opt);
}  // namespace detail

/// Allreduce of DEVICE buffers over an ordinary (host-memory) communicator,
/// such as MPI that is not CUDA-aware: the ring of ringflow::allreduce with
/// algo::ring, staged through pinned host memory, reductions by CUDA kernels.
/// `in` and `out` may be the same span. Bit-identical to the CPU ring
/// allreduce of the same data with the same segment size. Blocks until the
/// result is in `out`.
///
/// @code
/// ringflow::cuda::staged_allreduce(comm, std::span<const float>(d_in, n),
///                                  std::span<float>(d_out, n), ringflow::sum);
/// @endcode
template <element T, reduce_op Op = sum_op>
void staged_allreduce(const communicator& comm, std::span<const std::type_identity_t<T>> in,
                      std::span<T> out, Op /*op*/ = {}, const staged_options& opt = {}) {
  detail::staged_allreduce(comm, in.data(), out.data(), in.size(), out.size(), dtype_of<T>,
                           Op::kind, opt);
}

/// In-place staged allreduce of a device buffer.
template <element T, reduce_op Op = sum_op>
void staged_allreduce(const communicator& comm, std::span<T> data, Op op = {},
                      const staged_options& opt = {}) {
  staged_allreduce<T, Op>(comm, std::span<const T>(data), data, op, opt);
}

/// Staged reduce-scatter of device buffers: rank r gets piece r
/// (ringflow::partition) of the reduction in `out`, like
/// ringflow::reduce_scatter. `out` may alias that piece of `in`.
template <element T, reduce_op Op = sum_op>
void staged_reduce_scatter(const communicator& comm, std::span<const std::type_identity_t<T>> in,
                           std::span<T> out, Op /*op*/ = {}, const staged_options& opt = {}) {
  detail::staged_reduce_scatter(comm, in.data(), out.data(), in.size(), out.size(), dtype_of<T>,
                                Op::kind, opt);
}

/// Staged allgather of device buffers: rank r contributes piece r of `out`
/// in `in`, like ringflow::allgather. `in` may alias its piece of `out`.
template <element T>
void staged_allgather(const communicator& comm, std::span<const std::type_identity_t<T>> in,
                      std::span<T> out, const staged_options& opt = {}) {
  detail::staged_allgather(comm, in.data(), out.data(), in.size(), out.size(), dtype_of<T>, opt);
}

/// Staged broadcast of a device buffer from `root` (same size everywhere).
template <element T>
void staged_broadcast(const communicator& comm, std::span<T> data, int root,
                      const staged_options& opt = {}) {
  detail::staged_broadcast(comm, data.data(), data.size(), dtype_of<T>, root, opt);
}

}  // namespace ringflow::cuda
