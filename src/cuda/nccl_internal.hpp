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

}  // namespace ringflow::cuda::detail

namespace ringflow::cuda {
// The names every nccl_*.cpp uses unqualified.
using detail::nccl_group;
using detail::nccl_state;
using detail::require_device;
}  // namespace ringflow::cuda

#endif  // RINGFLOW_HAS_NCCL
