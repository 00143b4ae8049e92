// The NCCL backend (ringflow/cuda/nccl.hpp), part 4 of 4: nccl_transport,
// ringflow's transport over NCCL point-to-point on per-direction channels.
#include "nccl_internal.hpp"

#if RINGFLOW_HAS_NCCL

namespace ringflow::cuda {

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
