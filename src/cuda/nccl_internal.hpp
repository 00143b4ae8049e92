// Private to the NCCL backend's translation units (nccl_*.cpp): the state a
// communicator and its transports share, and the checks they all make.
#pragma once

#include "ringflow/cuda/nccl.hpp"

#if RINGFLOW_HAS_NCCL

#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <span>
#include <string_view>
#include <thread>
#include <vector>

#include "dispatch.hpp"
#include "ringflow/coll/collectives.hpp"
#include "ringflow/coll/extension.hpp"
#include "ringflow/coll/topology.hpp"
#include "ringflow/core/log.hpp"
#include "ringflow/cuda/check.hpp"
#include "ringflow/cuda/device.hpp"
#include "ringflow/cuda/reduce.hpp"
#include "ringflow/cuda/ring.hpp"
#include "ringflow/cuda/runtime.hpp"

namespace ringflow::cuda::detail {

// --- Shared state ------------------------------------------------------------

/// One NCCL communicator and what the collectives and the transport need.
/// Shared by the nccl_communicator and its transport(s).
struct nccl_state {
  ncclComm_t comm = nullptr;
  int rank = -1;
  int size = 0;
  int device = -1;
  communicator base;
  /// Set after a failed or timed-out operation: destruction aborts instead
  /// of ncclCommDestroy (which would wait for operations that never finish).
  mutable std::atomic<bool> broken{false};
  std::mutex transport_mutex;
  /// Made on first use and kept (its channels are collective to build). It
  /// holds this state too: ~nccl_communicator() breaks the cycle.
  std::shared_ptr<nccl_transport> transport;

  nccl_state() = default;
  nccl_state(const nccl_state&) = delete;
  nccl_state& operator=(const nccl_state&) = delete;

  ~nccl_state() { release(); }

  void release() noexcept {
    if (comm == nullptr) return;
    ncclComm_t c = std::exchange(comm, nullptr);
    int previous = -1;
    const bool restore = cudaGetDevice(&previous) == cudaSuccess && previous != device;
    if (restore) RINGFLOW_LOG_CUDA(cudaSetDevice(device));
    if (broken.load()) {
      RINGFLOW_LOG_NCCL(ncclCommAbort(c));
    } else {
      RINGFLOW_LOG_NCCL(ncclCommDestroy(c));
    }
    if (restore) RINGFLOW_LOG_CUDA(cudaSetDevice(previous));
  }

  /// The handle, or comm_error if abort() released it.
  ncclComm_t live(const char* what) const {
    if (comm == nullptr) {
      throw comm_error(
          fmt::format("nccl {} on rank {}: the NCCL communicator was aborted", what, rank));
    }
    return comm;
  }
};

/// ncclGroupStart/End for a scope; a group left open by an exception is
/// closed (and its failure logged) so the thread's NCCL state stays usable.
class nccl_group {
 public:
  nccl_group() { RINGFLOW_CHECK_NCCL(ncclGroupStart()); }
  nccl_group(const nccl_group&) = delete;
  nccl_group& operator=(const nccl_group&) = delete;
  ~nccl_group() {
    if (open_) RINGFLOW_LOG_NCCL(ncclGroupEnd());
  }
  void end() {
    open_ = false;
    RINGFLOW_CHECK_NCCL(ncclGroupEnd());
  }

 private:
  bool open_ = true;
};

inline const char* kind_text(memory_kind k) {
  switch (k) {
    case memory_kind::host: return "pageable host memory";
    case memory_kind::pinned: return "pinned host memory";
    case memory_kind::device: return "device memory";
    case memory_kind::managed: return "managed memory";
  }
  return "unknown memory";
}

/// Throws usage_error unless `p` (count elements) is device or managed memory
/// on the communicator's GPU. Empty buffers are not checked.
inline void require_device(const nccl_state& st, const char* what, const char* which, const void* p,
                           std::size_t count) {
  if (count == 0) return;
  if (p == nullptr) {
    throw usage_error(fmt::format("nccl {} on rank {}: the {} is a null pointer with {} elements",
                                  what, st.rank, which, count));
  }
  const memory_kind kind = pointer_kind(p);
  if (kind != memory_kind::device && kind != memory_kind::managed) {
    throw usage_error(fmt::format(
        "nccl {} on rank {}: the {} ({}) is {}, not device memory: NCCL works on device buffers "
        "(cuda::device_buffer on GPU {}); the CPU collectives (ringflow::allreduce...) take host "
        "buffers",
        what, st.rank, which, p, kind_text(kind), st.device));
  }
  if (kind == memory_kind::device) {
    cudaPointerAttributes attr{};
    RINGFLOW_CHECK_CUDA(cudaPointerGetAttributes(&attr, p));
    if (attr.device != st.device) {
      throw usage_error(fmt::format(
          "nccl {} on rank {}: the {} ({}) is on GPU {} but this rank's NCCL communicator uses "
          "GPU {}",
          what, st.rank, which, p, attr.device, st.device));
    }
  }
}

// --- What the collectives share (nccl_collectives.cpp, nccl_peer_collectives.cpp) ---

/// NCCL's op for ringflow's. avg is a sum here for every type, and the
/// caller divides afterwards with ringflow's finish(): ringflow's avg is one
/// division of the finished sum (round(round(sum) / n) for floats, truncation
/// toward zero for integers, as on the CPU), whereas ncclAvg pre-multiplies
/// each input by 1/n (other rounding).
inline ncclRedOp_t op_for(op_kind op) { return op == op_kind::avg ? ncclSum : nccl_op(op); }

/// After an avg: the division ringflow's CPU collectives do.
inline void finish_avg(dtype t, op_kind op, void* data, std::size_t n, int nranks, cudaStream_t s) {
  if (op == op_kind::avg && n > 0) cuda::finish(t, op, data, n, nranks, s);
}

/// `p` advanced by `elems` elements of `esz` bytes.
inline std::byte* at(void* p, std::size_t elems, std::size_t esz) {
  return static_cast<std::byte*>(p) + elems * esz;
}
inline const std::byte* at(const void* p, std::size_t elems, std::size_t esz) {
  return static_cast<const std::byte*>(p) + elems * esz;
}

/// The state of a live communicator (usage_error when moved from,
/// comm_error when aborted).
inline const nccl_state& usable(const std::shared_ptr<nccl_state>& st, const char* what) {
  if (!st) throw usage_error(fmt::format("nccl {} on a moved-from nccl_communicator", what));
  st->live(what);
  return *st;
}

/// Runs `body` (which queues NCCL work); a failure marks the communicator
/// broken, so it is aborted rather than destroyed.
template <class F>
void guarded(const nccl_state& st, F&& body) {
  try {
    body();
  } catch (const nccl_error&) {
    st.broken.store(true);
    throw;
  }
}

/// Piece q of a collective over pieces: counts[q] elements at offsets[q].
struct pieces {
  std::span<const std::size_t> counts;
  std::span<const std::size_t> offsets;
};

/// One ncclReduce per nonempty piece, rooted at its owner, in one group:
/// rank r's piece lands in `out`. Only the root's receive buffer is used; the
/// others pass their send pointer, never written. No avg division here.
void grouped_reduce_pieces(const nccl_state& st, const void* in, void* out, pieces ps, dtype type,
                           op_kind op, cudaStream_t stream);

/// One ncclBroadcast per nonempty piece, rooted at its owner, in one group:
/// every rank receives piece q at out + out_offsets[q]; rank r sends `in`.
void grouped_broadcast_pieces(const nccl_state& st, const void* in, void* out, pieces ps,
                              dtype type, cudaStream_t stream);

}  // namespace ringflow::cuda::detail

namespace ringflow::cuda {
// The names every nccl_*.cpp uses unqualified.
using detail::at;
using detail::finish_avg;
using detail::guarded;
using detail::nccl_group;
using detail::nccl_state;
using detail::op_for;
using detail::require_device;
using detail::usable;
}  // namespace ringflow::cuda

#endif  // RINGFLOW_HAS_NCCL
