// The NCCL backend (ringflow/cuda/nccl.hpp): checked NCCL calls, the
// communicator bootstrap over a ringflow communicator, NCCL collectives on
// device buffers, our own ring over ncclSend/ncclRecv, and the p2p transport.
// Host code (the C++ compiler), so it may format and log; the reduction
// kernels it queues are cuda::reduce / cuda::finish (src/cuda/reduce.cu).
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

#include "ringflow/coll/collectives.hpp"
#include "ringflow/coll/extension.hpp"
#include "ringflow/coll/topology.hpp"
#include "ringflow/core/log.hpp"
#include "ringflow/cuda/check.hpp"
#include "ringflow/cuda/device.hpp"
#include "ringflow/cuda/reduce.hpp"
#include "ringflow/cuda/ring.hpp"
#include "ringflow/cuda/runtime.hpp"
#include "dispatch.hpp"

namespace ringflow::cuda {

// --- Checked calls -----------------------------------------------------------

namespace detail {

const char* nccl_result_name(ncclResult_t code) noexcept {
  switch (code) {
    case ncclSuccess: return "ncclSuccess";
    case ncclUnhandledCudaError: return "ncclUnhandledCudaError";
    case ncclSystemError: return "ncclSystemError";
    case ncclInternalError: return "ncclInternalError";
    case ncclInvalidArgument: return "ncclInvalidArgument";
    case ncclInvalidUsage: return "ncclInvalidUsage";
    case ncclRemoteError: return "ncclRemoteError";
    case ncclInProgress: return "ncclInProgress";
    default: return "ncclResult(unknown)";
  }
}

namespace {
std::string nccl_text(ncclResult_t code) {
  std::string text = ncclGetErrorString(code);
  // The last error is per thread (the argument is unused by NCCL): the
  // detailed reason behind the generic string, when NCCL recorded one.
  if (const char* last = ncclGetLastError(nullptr); last != nullptr && *last != '\0') {
    text += ": ";
    text += last;
  }
  return text;
}
}  // namespace

void throw_nccl_error(ncclResult_t code, const char* call, const char* file, int line) {
  throw nccl_error(cuda::detail::describe_failure(nccl_result_name(code), nccl_text(code).c_str(),
                                                  call, file, line),
                   code);
}

void log_nccl_error(ncclResult_t code, const char* call, const char* file, int line) noexcept {
  try {
    ringflow::log::write(ringflow::log::level::error,
                         cuda::detail::describe_failure(nccl_result_name(code),
                                                        nccl_text(code).c_str(), call, file, line));
  } catch (...) {}
}

ncclDataType_t nccl_type(dtype t) {
  switch (t) {
    case dtype::f32: return ncclFloat32;
    case dtype::f64: return ncclFloat64;
    case dtype::i8: return ncclInt8;
    case dtype::u8: return ncclUint8;
    case dtype::i32: return ncclInt32;
    case dtype::i64: return ncclInt64;
    case dtype::f16: return ncclFloat16;
    case dtype::bf16: return ncclBfloat16;
  }
  throw usage_error(fmt::format("nccl: no NCCL type for dtype {}", static_cast<int>(t)));
}

ncclRedOp_t nccl_op(op_kind k) {
  switch (k) {
    case op_kind::sum: return ncclSum;
    case op_kind::prod: return ncclProd;
    case op_kind::min: return ncclMin;
    case op_kind::max: return ncclMax;
    case op_kind::avg: return ncclAvg;
  }
  throw usage_error(fmt::format("nccl: no NCCL op for op {}", static_cast<int>(k)));
}

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

}  // namespace detail

namespace {

using detail::nccl_state;

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

const char* kind_text(memory_kind k) {
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
void require_device(const nccl_state& st, const char* what, const char* which, const void* p,
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

/// NCCL's op for ringflow's. avg is a sum here for every type, and the
/// caller divides afterwards with ringflow's finish(): ringflow's avg is one
/// division of the finished sum (round(round(sum) / n) for floats, truncation
/// toward zero for integers, as on the CPU), whereas ncclAvg pre-multiplies
/// each input by 1/n (other rounding).
ncclRedOp_t op_for(dtype, op_kind op) {
  if (op == op_kind::avg) return ncclSum;
  return detail::nccl_op(op);
}

/// After an avg: the division ringflow's CPU collectives do.
void finish_avg(dtype t, op_kind op, void* data, std::size_t n, int nranks, cudaStream_t s) {
  if (op == op_kind::avg && n > 0) cuda::finish(t, op, data, n, nranks, s);
}

std::byte* at(void* p, std::size_t elems, std::size_t esz) {
  return static_cast<std::byte*>(p) + elems * esz;
}
const std::byte* at(const void* p, std::size_t elems, std::size_t esz) {
  return static_cast<const std::byte*>(p) + elems * esz;
}

// --- Bootstrap ----------------------------------------------------------------

struct host_record {
  char host[64];
  std::int32_t device_count;
  std::int32_t requested;
};

struct gpu_record {
  unsigned char uuid[16];
  char bus[32];
  std::int32_t device;
  std::int32_t status;  // cudaError_t of the property queries
};

template <class Rec>
std::vector<Rec> allgather_records(const communicator& comm, const Rec& mine) {
  std::vector<Rec> all(static_cast<std::size_t>(comm.size()));
  ringflow::allgather<std::uint8_t>(
      comm,
      std::span<const std::uint8_t>(reinterpret_cast<const std::uint8_t*>(&mine), sizeof mine),
      std::span<std::uint8_t>(reinterpret_cast<std::uint8_t*>(all.data()),
                              all.size() * sizeof(Rec)));
  return all;
}

std::string join_ranks(const std::vector<int>& ranks) {
  std::string s;
  for (std::size_t i = 0; i < ranks.size(); ++i) {
    if (i) s += i + 1 == ranks.size() ? " and " : ", ";
    s += std::to_string(ranks[i]);
  }
  return s;
}

/// Picks every rank's GPU from the exchanged host records, identically on
/// every rank, or throws the same error on every rank.
std::vector<int> choose_devices(const communicator& comm, const std::vector<host_record>& all) {
  const int p = comm.size(), r = comm.rank();
  std::vector<std::string> names;
  for (const auto& h : all) names.emplace_back(h.host, strnlen(h.host, sizeof h.host));
  // Real hosts, not RINGFLOW_NODE_SIZE's emulated nodes: GPUs are physical.
  const topology topo = topology::from_names(names);
  std::vector<int> none, bad, device(static_cast<std::size_t>(p), -1);
  for (int q = 0; q < p; ++q) {
    const host_record& h = all[static_cast<std::size_t>(q)];
    if (h.device_count <= 0) {
      none.push_back(q);
      continue;
    }
    if (h.requested >= h.device_count || h.requested < -1) {
      bad.push_back(q);
      continue;
    }
    const auto& node =
        topo.nodes[static_cast<std::size_t>(topo.node_of[static_cast<std::size_t>(q)])];
    const int local = static_cast<int>(std::find(node.begin(), node.end(), q) - node.begin());
    device[static_cast<std::size_t>(q)] = h.requested >= 0 ? h.requested : local % h.device_count;
  }
  if (!none.empty()) {
    throw not_supported_error(fmt::format(
        "nccl_communicator on rank {}: rank{} {} see{} no GPU (CUDA_VISIBLE_DEVICES, driver?); "
        "NCCL needs one GPU per rank",
        r, none.size() == 1 ? "" : "s", join_ranks(none), none.size() == 1 ? "s" : ""));
  }
  if (!bad.empty()) {
    std::string which;
    for (int q : bad) {
      const host_record& h = all[static_cast<std::size_t>(q)];
      which += fmt::format("{}rank {} asked for GPU {} of {}", which.empty() ? "" : ", ", q,
                           h.requested, h.device_count);
    }
    throw usage_error(fmt::format("nccl_communicator on rank {}: no such GPU: {}", r, which));
  }
  return device;
}

/// Throws usage_error on every rank when two ranks would use one GPU.
void require_distinct_gpus(const communicator& comm, const std::vector<host_record>& hosts,
                           const std::vector<gpu_record>& gpus) {
  const int p = comm.size();
  for (int q = 0; q < p; ++q) {
    const gpu_record& g = gpus[static_cast<std::size_t>(q)];
    if (g.status != 0) {
      throw comm_error(fmt::format(
          "nccl_communicator on rank {}: rank {} could not query GPU {}: {}", comm.rank(), q,
          g.device, cudaGetErrorString(static_cast<cudaError_t>(g.status))));
    }
  }
  // Same GPU = same UUID: also right when CUDA_VISIBLE_DEVICES gives the
  // ranks different numberings of the same cards.
  // A driver that reports no UUID (all zero): the host and PCI address.
  std::map<std::string, std::vector<int>> users;
  for (int q = 0; q < p; ++q) {
    const gpu_record& g = gpus[static_cast<std::size_t>(q)];
    std::string key(reinterpret_cast<const char*>(g.uuid), sizeof g.uuid);
    if (key == std::string(sizeof g.uuid, '\0')) {
      const host_record& h = hosts[static_cast<std::size_t>(q)];
      const std::string bus(g.bus, strnlen(g.bus, sizeof g.bus));
      key = "host:" + std::string(h.host, strnlen(h.host, sizeof h.host)) + "/" +
            (bus.empty() ? "device " + std::to_string(g.device) : bus);
    }
    users[key].push_back(q);
  }
  std::string clashes;
  for (const auto& [uuid, ranks] : users) {
    if (ranks.size() < 2) continue;
    const int q = ranks.front();
    const host_record& h = hosts[static_cast<std::size_t>(q)];
    const gpu_record& g = gpus[static_cast<std::size_t>(q)];
    clashes += fmt::format("{}ranks {} on host '{}' share GPU {} ({})", clashes.empty() ? "" : "; ",
                           join_ranks(ranks), std::string(h.host, strnlen(h.host, sizeof h.host)),
                           g.device, std::string(g.bus, strnlen(g.bus, sizeof g.bus)));
  }
  if (!clashes.empty()) {
    throw usage_error(fmt::format(
        "nccl_communicator on rank {}: {}. NCCL does not support two ranks of one communicator "
        "on the same GPU (it fails or hangs): run one rank per GPU (or give each rank its own "
        "GPU with nccl_options::device / CUDA_VISIBLE_DEVICES), or use the staged MPI path for "
        "ranks that share a GPU (cuda::staged_allreduce and friends, ringflow/cuda/ring.hpp; "
        "docs/gpu.md)",
        comm.rank(), clashes));
  }
}

}  // namespace

// --- nccl_communicator ------------------------------------------------------

nccl_communicator::nccl_communicator(const communicator& comm, nccl_options opt) {
  if (!comm.valid()) throw usage_error("nccl_communicator: the ringflow communicator is invalid");
  const int p = comm.size(), r = comm.rank();
  set_error_rank(r);

  // 1. Hosts and GPU counts -> every rank's GPU (the same answer everywhere).
  host_record me{};
  gethostname(me.host, sizeof me.host - 1);
  me.device_count = cuda::device_count();
  me.requested = opt.device;  // checked in choose_devices, on every rank alike
  const std::vector<host_record> hosts = allgather_records(comm, me);
  const int device = choose_devices(comm, hosts)[static_cast<std::size_t>(r)];

  // 2. Which physical GPU that is; two ranks on one GPU fail here, before
  //    NCCL, on every rank alike.
  gpu_record gpu{};
  gpu.device = device;
  {
    cudaDeviceProp prop{};
    cudaError_t rc = cudaGetDeviceProperties(&prop, device);
    if (rc == cudaSuccess) {
      std::memcpy(gpu.uuid, prop.uuid.bytes, sizeof gpu.uuid);
      rc = cudaDeviceGetPCIBusId(gpu.bus, sizeof gpu.bus - 1, device);
    }
    if (rc != cudaSuccess) cudaGetLastError();
    gpu.status = static_cast<std::int32_t>(rc);
  }
  require_distinct_gpus(comm, hosts, allgather_records(comm, gpu));

  // 3. The unique id from rank 0 (with its status, so a failure there
  //    reaches every rank instead of leaving them waiting), then init.
  RINGFLOW_CHECK_CUDA(cudaSetDevice(device));
  struct id_message {
    std::int32_t status;
    ncclUniqueId id;
  } msg{};
  if (r == 0) msg.status = static_cast<std::int32_t>(ncclGetUniqueId(&msg.id));
  ringflow::broadcast<std::uint8_t>(
      comm, std::span<std::uint8_t>(reinterpret_cast<std::uint8_t*>(&msg), sizeof msg), 0);
  if (msg.status != ncclSuccess) {
    const auto code = static_cast<ncclResult_t>(msg.status);
    throw nccl_error(fmt::format("nccl_communicator on rank {}: ncclGetUniqueId failed on rank 0: "
                                 "{} ({})",
                                 r, ncclGetErrorString(code), detail::nccl_result_name(code)),
                     code);
  }
  auto st = std::make_shared<nccl_state>();
  st->rank = r;
  st->size = p;
  st->device = device;
  st->base = comm;
  ncclComm_t made = nullptr;
  const ncclResult_t rc = ncclCommInitRank(&made, p, msg.id, r);
  if (rc != ncclSuccess) {
    if (made != nullptr) RINGFLOW_LOG_NCCL(ncclCommAbort(made));
    detail::throw_nccl_error(rc, "ncclCommInitRank(&comm, nranks, id, rank)", __FILE__, __LINE__);
  }
  st->comm = made;
  state_ = std::move(st);
  log::debug("nccl: rank {} of {} on GPU {} ({})", r, p, device,
             std::string(gpu.bus, strnlen(gpu.bus, sizeof gpu.bus)));
}

namespace {
/// Lets go of a communicator's state, first breaking the state <-> transport
/// cycle. The NCCL handles go when the last user does: here, or with the last
/// copy of the transport someone else still holds.
void drop(std::shared_ptr<nccl_state>& st) noexcept {
  if (!st) return;
  std::shared_ptr<nccl_transport> t;
  {
    std::lock_guard lock(st->transport_mutex);
    t = std::move(st->transport);
  }
  t.reset();
  st.reset();
}
}  // namespace

nccl_communicator::nccl_communicator(nccl_communicator&&) noexcept = default;
nccl_communicator& nccl_communicator::operator=(nccl_communicator&& o) noexcept {
  if (this != &o) {
    drop(state_);
    state_ = std::move(o.state_);
  }
  return *this;
}
nccl_communicator::~nccl_communicator() { drop(state_); }

int nccl_communicator::rank() const noexcept { return state_ ? state_->rank : -1; }
int nccl_communicator::size() const noexcept { return state_ ? state_->size : 0; }
int nccl_communicator::device() const noexcept { return state_ ? state_->device : -1; }
ncclComm_t nccl_communicator::raw() const noexcept { return state_ ? state_->comm : nullptr; }
const communicator& nccl_communicator::base() const noexcept {
  static const communicator empty;
  return state_ ? state_->base : empty;
}

void nccl_communicator::abort() noexcept {
  if (!state_) return;
  std::shared_ptr<nccl_transport> t;
  {
    std::lock_guard lock(state_->transport_mutex);
    t = state_->transport;
  }
  if (t) t->abort_channels();
  state_->broken.store(true);
  state_->release();
}

std::shared_ptr<nccl_transport> nccl_communicator::transport() const {
  if (!state_) throw usage_error("nccl_communicator::transport() on a moved-from communicator");
  std::lock_guard lock(state_->transport_mutex);
  if (!state_->transport) state_->transport = std::make_shared<nccl_transport>(state_);
  return state_->transport;
}

// --- Collectives ----------------------------------------------------------------

namespace {
const nccl_state& usable(const std::shared_ptr<nccl_state>& st, const char* what) {
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
    RINGFLOW_CHECK_NCCL(ncclAllReduce(in, out, in_count, detail::nccl_type(type), op_for(type, op),
                                      st.comm, stream));
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
  const ncclRedOp_t nop = op_for(type, op);
  guarded(st, [&] {
    if (in_count % static_cast<std::size_t>(p) == 0) {
      RINGFLOW_CHECK_NCCL(ncclReduceScatter(in, out, in_count / static_cast<std::size_t>(p), nt,
                                            nop, st.comm, stream));
    } else {
      // Unequal pieces: one ncclReduce per piece, rooted at its owner, in
      // one group (NCCL runs them together). Only the root's receive
      // buffer is used; the others pass their send pointer, never written.
      nccl_group g;
      for (int c = 0; c < p; ++c) {
        const chunk piece = partition(in_count, p, c);
        if (piece.count == 0) continue;
        const void* send = at(in, piece.offset, esz);
        void* recv = c == r ? out : const_cast<void*>(send);
        RINGFLOW_CHECK_NCCL(ncclReduce(send, recv, piece.count, nt, nop, c, st.comm, stream));
      }
      g.end();
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
  ext::begin_queued_collective(st.base, coll_kind::allgather, type, op_kind::sum,
                                       out_count);
  if (out_count == 0) return;
  device_guard dg(st.device);
  const ncclDataType_t nt = detail::nccl_type(type);
  guarded(st, [&] {
    if (out_count % static_cast<std::size_t>(p) == 0) {
      RINGFLOW_CHECK_NCCL(
          ncclAllGather(in, out, out_count / static_cast<std::size_t>(p), nt, st.comm, stream));
    } else {
      // Unequal pieces: every rank broadcasts its piece, all in one group.
      nccl_group g;
      for (int c = 0; c < p; ++c) {
        const chunk piece = partition(out_count, p, c);
        if (piece.count == 0) continue;
        void* recv = at(out, piece.offset, esz);
        const void* send = c == r ? in : recv;
        RINGFLOW_CHECK_NCCL(ncclBroadcast(send, recv, piece.count, nt, c, st.comm, stream));
      }
      g.end();
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
  ext::begin_queued_collective(st.base, coll_kind::broadcast, type, op_kind::sum, out_count,
                                       root);
  if (out_count == 0) return;
  device_guard dg(st.device);
  guarded(st, [&] {
    RINGFLOW_CHECK_NCCL(ncclBroadcast(r == root ? in : out, out, out_count, detail::nccl_type(type),
                                      root, st.comm, stream));
  });
}

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
      ext::ring_allreduce(m, *t, static_cast<const T*>(in), static_cast<T*>(out),
                                            in_count, Op{}, seg);
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

// --- nccl_transport -------------------------------------------------------------

namespace {
/// The channels need NCCL to run kernels of different communicators
/// concurrently; NCCL_LAUNCH_ORDER_IMPLICIT=1 orders them in host launch
/// order instead, and a ring posting its send before its receive would then
/// wait forever. Decided on every rank alike (over the ringflow
/// communicator) so no rank goes on into ncclCommSplit alone.
void require_concurrent_communicators(const nccl_state& st) {
  const char* env = std::getenv("NCCL_LAUNCH_ORDER_IMPLICIT");
  int implicit = env != nullptr && *env != '\0' && std::string_view(env) != "0" ? 1 : 0;
  if (st.base.valid()) {
    ringflow::allreduce(st.base, std::span<int>(&implicit, 1), ringflow::max);
  }
  if (implicit != 0) {
    throw usage_error(fmt::format(
        "nccl transport on rank {}: NCCL_LAUNCH_ORDER_IMPLICIT is set on some rank; it makes "
        "NCCL run the transport's send and receive channels one after another, and a ring that "
        "sends before it receives would hang: unset it (or set it to 0) for ringflow's NCCL "
        "transport and ring_allreduce (stream_ring_allreduce and the NCCL collectives do not "
        "need it)",
        st.rank));
  }
}
}  // namespace

struct nccl_transport::impl {
  struct op {
    bool is_send = false;
    void* data = nullptr;
    std::size_t bytes = 0;
    int peer = -1;
    int tag = 0;
    bool launched = false;
    std::shared_ptr<event> done;  // recorded after the launch it ran in
  };

  std::shared_ptr<nccl_state> state;
  int left = 0, right = 0;
  // Ring channels (p >= 2): duplicates of the communicator, one per colour,
  // such that the channel r -> r+1 has colour col(r) and col(r) != col(r-1).
  // A rank's sends to its right and its receives from its left then travel
  // on two different NCCL communicators, which NCCL does not order against
  // each other, and each channel carries one direction between one pair, so
  // posting order is matching order and nothing waits behind anything else.
  std::vector<std::shared_ptr<nccl_state>> channels;
  int out_channel = -1, in_channel = -1;
  std::unique_ptr<stream> send_s, recv_s, group_s;
  cudaStream_t after = nullptr;
  std::vector<std::shared_ptr<op>> queued;  // other peers: launched as one group

  static int colour(int r, int p) { return p % 2 == 1 && r == p - 1 ? 2 : r % 2; }

  explicit impl(std::shared_ptr<nccl_state> st) : state(std::move(st)) {
    const int p = state->size, r = state->rank;
    left = (r + p - 1) % p;
    right = (r + 1) % p;
    device_guard dg(state->device);
    send_s = std::make_unique<stream>();
    recv_s = std::make_unique<stream>();
    group_s = std::make_unique<stream>();
    if (p < 2) return;
    require_concurrent_communicators(*state);
    const int k = p % 2 == 0 ? 2 : 3;
    ncclComm_t parent = state->live("transport");
    for (int c = 0; c < k; ++c) {
      ncclComm_t dup = nullptr;
      RINGFLOW_CHECK_NCCL(ncclCommSplit(parent, 0, r, &dup, nullptr));
      auto cs = std::make_shared<nccl_state>();
      cs->comm = dup;
      cs->rank = r;
      cs->size = p;
      cs->device = state->device;
      channels.push_back(std::move(cs));
    }
    out_channel = colour(r, p);
    in_channel = colour(left, p);
    // Connect every channel now, one colour after another on every rank:
    // NCCL sets a pair up on the host the first time the pair talks, which
    // waits for the peer's matching call; done lazily in the middle of a
    // ring, every rank could be waiting for its neighbour's setup at once.
    device_buffer<std::uint8_t> warm(2);
    for (int c = 0; c < k; ++c) {
      const bool send = out_channel == c, recv = in_channel == c;
      if (!send && !recv) continue;
      nccl_group g;
      if (send) {
        RINGFLOW_CHECK_NCCL(ncclSend(warm.data(), 1, ncclUint8, right,
                                     channels[static_cast<std::size_t>(c)]->comm, *send_s));
      }
      if (recv) {
        RINGFLOW_CHECK_NCCL(ncclRecv(warm.data() + 1, 1, ncclUint8, left,
                                     channels[static_cast<std::size_t>(c)]->comm, *send_s));
      }
      g.end();
    }
    send_s->synchronize();
  }

  void mark_broken() noexcept {
    state->broken.store(true);
    for (auto& c : channels) c->broken.store(true);
  }

  /// The channel an operation travels on, or -1 for the grouped path.
  int channel_of(const op& o) const {
    if (channels.empty()) return -1;
    if (o.is_send && o.peer == right) return out_channel;
    if (!o.is_send && o.peer == left) return in_channel;
    return -1;
  }

  void wait_for_producer(cudaStream_t s) {
    if (after == nullptr) return;
    event e;
    e.record(after);
    e.wait_on(s);
  }

  /// A ring-neighbour operation: launched at once on its channel.
  void launch_on_channel(op& o, int c) {
    const nccl_state& cs = *channels[static_cast<std::size_t>(c)];
    ncclComm_t comm = cs.live("transport");
    state->live("transport");
    device_guard dg(state->device);
    try {
      stream& s = o.is_send ? *send_s : *recv_s;
      wait_for_producer(s);
      if (o.is_send) {
        RINGFLOW_CHECK_NCCL(ncclSend(o.data, o.bytes, ncclUint8, o.peer, comm, s));
      } else {
        RINGFLOW_CHECK_NCCL(ncclRecv(o.data, o.bytes, ncclUint8, o.peer, comm, s));
      }
      auto done = std::make_shared<event>();
      done->record(s);
      o.done = std::move(done);
      o.launched = true;
    } catch (...) {
      mark_broken();
      o.launched = true;  // failed: nothing to wait for
      throw;
    }
  }

  /// Launches every queued operation (peers other than the ring
  /// neighbours, or everything at one rank) as one NCCL group.
  void flush() {
    if (queued.empty()) return;
    std::vector<std::shared_ptr<op>> batch;
    batch.swap(queued);
    ncclComm_t comm = state->live("transport");
    device_guard dg(state->device);
    try {
      wait_for_producer(*group_s);
      nccl_group g;
      for (const auto& o : batch) {
        if (o->is_send) {
          RINGFLOW_CHECK_NCCL(ncclSend(o->data, o->bytes, ncclUint8, o->peer, comm, *group_s));
        } else {
          RINGFLOW_CHECK_NCCL(ncclRecv(o->data, o->bytes, ncclUint8, o->peer, comm, *group_s));
        }
      }
      g.end();
      auto done = std::make_shared<event>();
      done->record(*group_s);
      for (const auto& o : batch) {
        o->done = done;
        o->launched = true;
      }
    } catch (...) {
      mark_broken();
      for (const auto& o : batch) o->launched = true;
      throw;
    }
  }

  void check_async() {
    auto check = [&](const nccl_state& st) {
      ncclResult_t async = ncclSuccess;
      const ncclResult_t rc = ncclCommGetAsyncError(st.live("transport"), &async);
      if (rc != ncclSuccess) async = rc;
      if (async != ncclSuccess && async != ncclInProgress) {
        mark_broken();
        detail::throw_nccl_error(async, "ncclCommGetAsyncError (an NCCL operation failed)",
                                 __FILE__, __LINE__);
      }
    };
    check(*state);
    for (const auto& c : channels) check(*c);
  }
};

namespace {
class nccl_request final : public ext::request_state {
 public:
  nccl_request(std::shared_ptr<nccl_transport::impl> t, std::shared_ptr<nccl_transport::impl::op> o,
               std::chrono::milliseconds timeout)
      : t_(std::move(t)), o_(std::move(o)), timeout_(timeout) {}

  bool test() override {
    if (!o_->launched) t_->flush();
    return done();
  }

  void wait() override {
    if (!o_->launched) t_->flush();
    const auto deadline = ext::deadline_after(timeout_);
    for (unsigned spins = 0;; ++spins) {
      if (done()) return;
      if (spins >= 64) std::this_thread::yield();
      if ((spins & 1023u) == 1023u) {
        t_->check_async();
        if (std::chrono::steady_clock::now() > deadline) {
          t_->mark_broken();
          throw timeout_error(fmt::format(
              "rank {}: NCCL {} {} bytes {} rank {} (tag {}) did not complete within {} ms "
              "(RINGFLOW_TIMEOUT); is rank {} stuck, dead, or posting its messages in another "
              "order? (NCCL matches the messages between two ranks in posting order, not by tag)",
              t_->state->rank, o_->is_send ? "send of" : "receive of", o_->bytes,
              o_->is_send ? "to" : "from", o_->peer, o_->tag, timeout_.count(), o_->peer));
        }
      }
    }
  }

 private:
  bool done() {
    if (!o_->done) return true;  // empty message, or a launch that failed
    device_guard dg(t_->state->device);
    try {
      return o_->done->query();
    } catch (...) {
      t_->mark_broken();
      throw;
    }
  }

  std::shared_ptr<nccl_transport::impl> t_;
  std::shared_ptr<nccl_transport::impl::op> o_;
  std::chrono::milliseconds timeout_;
};
}  // namespace

nccl_transport::nccl_transport(std::shared_ptr<detail::nccl_state> state)
    : impl_(std::make_shared<impl>(std::move(state))) {}

nccl_transport::~nccl_transport() {
  try {
    impl_->flush();  // a queued send may be what a peer waits for
  } catch (const std::exception& e) {
    log::error("nccl transport: launching the queued operations at destruction failed: {}",
               e.what());
  }
}

int nccl_transport::rank() const noexcept { return impl_->state->rank; }
int nccl_transport::size() const noexcept { return impl_->state->size; }
ncclComm_t nccl_transport::raw() const noexcept { return impl_->state->comm; }
cudaStream_t nccl_transport::send_stream() const noexcept { return *impl_->send_s; }
cudaStream_t nccl_transport::recv_stream() const noexcept { return *impl_->recv_s; }
void nccl_transport::order_after(cudaStream_t s) noexcept { impl_->after = s; }
void nccl_transport::flush() { impl_->flush(); }

void nccl_transport::abort_channels() noexcept {
  impl_->mark_broken();
  for (auto& c : impl_->channels) c->release();
}

namespace {
void check_p2p(const nccl_state& st, const char* what, const void* data, std::size_t bytes,
               int peer) {
  if (peer < 0 || peer >= st.size) {
    throw usage_error(fmt::format("nccl {} on rank {}: peer {} is outside [0, {})", what, st.rank,
                                  peer, st.size));
  }
  require_device(st, what, "buffer", data, bytes);
}
}  // namespace

request nccl_transport::post(bool is_send, void* data, std::size_t bytes, int peer, int tag) {
  check_p2p(*impl_->state, is_send ? "isend" : "irecv", data, bytes, peer);
  auto o = std::make_shared<impl::op>();
  o->is_send = is_send;
  o->data = data;
  o->bytes = bytes;
  o->peer = peer;
  o->tag = tag;
  if (bytes == 0) {
    o->launched = true;  // nothing travels; both sides skip it alike
  } else if (const int c = impl_->channel_of(*o); c >= 0) {
    impl_->launch_on_channel(*o, c);
  } else {
    impl_->queued.push_back(o);
  }
  return request(std::make_unique<nccl_request>(impl_, std::move(o), timeout()));
}

request nccl_transport::isend(const void* data, std::size_t bytes, int peer, int tag) {
  return post(true, const_cast<void*>(data), bytes, peer, tag);
}

request nccl_transport::irecv(void* data, std::size_t bytes, int peer, int tag) {
  return post(false, data, bytes, peer, tag);
}

std::shared_ptr<ringflow::transport> nccl_transport::split(int color, int key) {
  flush();
  const nccl_state& st = *impl_->state;
  ncclComm_t parent = st.live("split");
  device_guard dg(st.device);
  // The ringflow side splits alike, so the child's checked mode and
  // bootstrap communicator match its ranks.
  communicator base_child;
  if (st.base.valid()) base_child = st.base.split(color, key);
  ncclComm_t child = nullptr;
  RINGFLOW_CHECK_NCCL(
      ncclCommSplit(parent, color < 0 ? NCCL_SPLIT_NOCOLOR : color, key, &child, nullptr));
  if (color < 0 || child == nullptr) return nullptr;
  auto cs = std::make_shared<nccl_state>();
  cs->comm = child;
  cs->device = st.device;
  cs->base = base_child;
  RINGFLOW_CHECK_NCCL(ncclCommUserRank(child, &cs->rank));
  RINGFLOW_CHECK_NCCL(ncclCommCount(child, &cs->size));
  auto t = std::make_shared<nccl_transport>(cs);
  t->set_timeout(timeout());
  return t;
}

}  // namespace ringflow::cuda

#endif  // RINGFLOW_HAS_NCCL
