// The NCCL backend (ringflow/cuda/nccl.hpp), part 2 of 4: the bootstrap
// (which GPU each rank takes, the unique id over the ringflow communicator)
// and nccl_communicator's lifetime (destroy, abort, its transport).
#include "nccl_internal.hpp"

#if RINGFLOW_HAS_NCCL

namespace ringflow::cuda {

// --- Bootstrap ----------------------------------------------------------------

namespace {

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

}  // namespace ringflow::cuda

#endif  // RINGFLOW_HAS_NCCL
