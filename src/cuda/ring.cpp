// The device memory policy of the ring (ringflow/cuda/ring.hpp) and the staged
// MPI collectives. Host code (the C++ compiler): it formats messages with fmt
// and drives the transport; the kernels are cuda::reduce / cuda::finish.
// The policy's logic (queues, slots, when to post what) is
// ext::staged_ring_memory of coll/extension.hpp (ring_staging.hpp), tested on the CPU with
// a lazy host stream; here it gets a CUDA stream (cuda_ops).
#include "ringflow/cuda/ring.hpp"

#include <cuda_runtime_api.h>
#include <fmt/format.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <utility>

#include "dispatch.hpp"
#include "ringflow/coll/extension.hpp"
#include "ringflow/coll/options.hpp"
#include "ringflow/coll/partition.hpp"
#include "ringflow/core/error.hpp"
#include "ringflow/cuda/check.hpp"
#include "ringflow/cuda/reduce.hpp"
#include "ringflow/cuda/runtime.hpp"

namespace ringflow::cuda {

namespace {

/// Staging memory and CUDA objects reused across calls (allocating pinned
/// memory costs milliseconds). One per thread: a collective runs on one
/// thread from start to end. Grown on demand, never shrunk.
struct staging_cache {
  int device = -1;
  bool busy = false;
  std::optional<cuda::stream> s;
  pinned_buffer<std::byte> send_blocks;  // staged sends: slots x segment
  pinned_buffer<std::byte> recv_slots;   // staged receives: slots x segment
  device_buffer<std::byte> dev_slots;    // received segments on the device
  device_buffer<std::byte> partial;      // reduce_scatter's partial sums
  std::vector<event> send_events;        // staged_broadcast's two windows
  std::vector<event> extra_events;       // markers of the staged ring (cuda_ops)
  std::optional<event> start;

  void bind_device() {
    int dev = 0;
    RINGFLOW_CHECK_CUDA(cudaGetDevice(&dev));
    if (dev == device) return;
    // Buffers and streams belong to the device they were made on.
    send_blocks = {};
    recv_slots = {};
    dev_slots = {};
    partial = {};
    send_events.clear();
    extra_events.clear();
    start.reset();
    s.reset();
    device = dev;
  }
};

template <class B>
void grow(B& buf, std::size_t bytes) {
  if (buf.size() < bytes) {
    buf = B();  // free first: the peak is one buffer, not two
    buf = B(bytes);
  }
}

void grow_events(std::vector<event>& v, std::size_t n) {
  while (v.size() < n) v.emplace_back();
}

thread_local staging_cache t_cache;

/// The ops of ext::staged_ring_memory on a CUDA stream: staging memory
/// from the thread's cache, copies with cudaMemcpyAsync, reductions by
/// cuda::reduce / cuda::finish, markers as events.
class cuda_ops {
 public:
  explicit cuda_ops(cudaStream_t after) {
    if (t_cache.busy) {
      own_ = std::make_unique<staging_cache>();
      c_ = own_.get();
    } else {
      c_ = &t_cache;
    }
    c_->bind_device();
    c_->busy = true;
    if (!c_->s) c_->s.emplace();
    s_ = c_->s->get();
    if (!c_->start) c_->start.emplace();
    // The input may still be being written on the caller's stream.
    c_->start->record(after);
    c_->start->wait_on(s_);
    for (int e = static_cast<int>(c_->extra_events.size()); e-- > 0;) free_.push_back(e);
  }
  ~cuda_ops() {
    // After an exception: queued copies must not outlive the call's buffers.
    RINGFLOW_LOG_CUDA(cudaStreamSynchronize(s_));
    c_->busy = false;
  }
  cuda_ops(const cuda_ops&) = delete;
  cuda_ops& operator=(const cuda_ops&) = delete;

  cudaStream_t stream() const noexcept { return s_; }

  void reserve_blocks(std::size_t n, std::size_t bytes) {
    grow(c_->send_blocks, n * bytes);
    block_bytes_ = bytes;
  }
  void reserve_slots(std::size_t n, std::size_t bytes, bool host_too) {
    grow(c_->dev_slots, n * bytes);
    if (host_too) grow(c_->recv_slots, n * bytes);
    slot_bytes_ = bytes;
  }
  std::byte* send_block(std::size_t i) { return c_->send_blocks.data() + i * block_bytes_; }
  std::byte* recv_slot(std::size_t k) { return c_->recv_slots.data() + k * slot_bytes_; }
  std::byte* device_slot(std::size_t k) { return c_->dev_slots.data() + k * slot_bytes_; }
  void* partial(std::size_t bytes) {
    grow(c_->partial, bytes);
    return c_->partial.data();
  }

  void to_host(void* dst, const void* src, std::size_t bytes) {
    RINGFLOW_CHECK_CUDA(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, s_));
  }
  void to_device(void* dst, const void* src, std::size_t bytes) {
    RINGFLOW_CHECK_CUDA(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, s_));
  }
  void on_device(void* dst, const void* src, std::size_t bytes) {
    RINGFLOW_CHECK_CUDA(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, s_));
  }
  void reduce(dtype type, op_kind op, void* dst, const void* a, const void* b, std::size_t n) {
    cuda::reduce(type, op, dst, a, b, n, s_);
  }
  void finish(dtype type, void* dst, std::size_t n, int p) {
    cuda::finish(type, op_kind::avg, dst, n, p, s_);
  }

  int mark() {
    int e;
    if (free_.empty()) {
      c_->extra_events.emplace_back();
      e = static_cast<int>(c_->extra_events.size()) - 1;
    } else {
      e = free_.back();
      free_.pop_back();
    }
    c_->extra_events[static_cast<std::size_t>(e)].record(s_);
    return e;
  }
  bool done(int m) { return c_->extra_events[static_cast<std::size_t>(m)].query(); }
  void release(int m) { free_.push_back(m); }
  void synchronize() { RINGFLOW_CHECK_CUDA(cudaStreamSynchronize(s_)); }

 private:
  std::unique_ptr<staging_cache> own_;  // when the thread's cache is in use
  staging_cache* c_ = nullptr;
  cudaStream_t s_ = nullptr;
  std::size_t block_bytes_ = 0, slot_bytes_ = 0;
  std::vector<int> free_;  // extra_events not in use by this call
};

}  // namespace

// Declared first, destroyed last: the engine's pending requests wait before
// the ops give the staging memory and the stream back.
struct device_ring_memory::impl {
  cuda_ops ops;
  ext::staged_ring_memory<cuda_ops> ring;
  impl(transport& t, ring_memory_mode mode, std::size_t seg, cudaStream_t after, int slots)
      : ops(after), ring(ops, t,
                         mode == ring_memory_mode::staged ? ext::staging_mode::staged
                                                          : ext::staging_mode::direct,
                         seg, static_cast<std::size_t>(std::max(slots, 2))) {}
};

device_ring_memory::device_ring_memory(transport& t, ring_memory_mode mode,
                                       std::size_t segment_bytes, cudaStream_t after, int slots)
    : impl_(std::make_unique<impl>(t, mode, segment_bytes, after, slots)) {}

device_ring_memory::~device_ring_memory() = default;

cudaStream_t device_ring_memory::stream() const noexcept { return impl_->ops.stream(); }

void device_ring_memory::sources_read(std::vector<request>& sends) {
  impl_->ring.sources_read(sends);
}
void device_ring_memory::complete(std::vector<request>& sends) { impl_->ring.complete(sends); }
std::size_t device_ring_memory::recv_depth() const noexcept { return impl_->ring.recv_depth(); }
std::size_t device_ring_memory::gather_depth(std::size_t units) {
  return impl_->ring.gather_depth(units);
}
void device_ring_memory::send_bytes(const void* src, std::size_t bytes, int peer, int tag,
                                    const void* group) {
  impl_->ring.send_bytes(src, bytes, peer, tag, group);
}
void device_ring_memory::open_slots_bytes(std::size_t /*depth*/, std::size_t slot_bytes) {
  impl_->ring.open_slots_bytes(slot_bytes);
}
void device_ring_memory::post_recv_bytes(std::size_t k, std::size_t bytes, int peer, int tag) {
  impl_->ring.post_recv_bytes(k, bytes, peer, tag);
}
void device_ring_memory::reduce_received_elems(std::size_t k, dtype type, op_kind op, void* dst,
                                               const void* mine, std::size_t n) {
  impl_->ring.reduce_received_elems(k, type, op, dst, mine, n);
}
void device_ring_memory::finish_elems(dtype type, void* dst, std::size_t n, int p) {
  impl_->ring.finish_elems(type, dst, n, p);
}
void device_ring_memory::post_gather_bytes(std::size_t k, void* dst, std::size_t bytes, int peer,
                                           int tag) {
  impl_->ring.post_gather_bytes(k, dst, bytes, peer, tag);
}
void device_ring_memory::land_bytes(std::size_t k, void* dst, std::size_t bytes) {
  impl_->ring.land_bytes(k, dst, bytes);
}
void device_ring_memory::forward_bytes(std::size_t /*k*/, const void* dst, std::size_t bytes,
                                       int peer, int tag, const void* group) {
  impl_->ring.forward_bytes(dst, bytes, peer, tag, group);
}
void device_ring_memory::copy_bytes(void* dst, const void* src, std::size_t bytes) {
  impl_->ops.on_device(dst, src, bytes);
}
void* device_ring_memory::partial_bytes(std::size_t bytes) { return impl_->ops.partial(bytes); }

namespace detail {

namespace {

std::string_view kind_name(memory_kind k) {
  switch (k) {
    case memory_kind::host: return "ordinary host";
    case memory_kind::pinned: return "pinned host";
    case memory_kind::device: return "device";
    case memory_kind::managed: return "managed";
  }
  return "unknown";
}

/// The staged path reads and writes through cudaMemcpyAsync and kernels:
/// the buffers must be GPU memory (device or managed).
void require_device(const communicator& comm, const char* what, const char* name, const void* p,
                    std::size_t count) {
  if (count == 0) return;
  if (p == nullptr) {
    throw usage_error(fmt::format("{} on rank {}: `{}` is a null pointer ({} elements)", what,
                                  comm.rank(), name, count));
  }
  const memory_kind k = pointer_kind(p);
  if (k == memory_kind::device || k == memory_kind::managed) return;
  throw usage_error(fmt::format(
      "{} on rank {}: `{}` points to {} memory, but the staged path takes device pointers "
      "(cudaMalloc, cuda::device_buffer); use ringflow::{} for host buffers",
      what, comm.rank(), name, kind_name(k), std::string_view(what).substr(7)));
}

void require_slots(const communicator& comm, const char* what, const staged_options& opt) {
  if (opt.slots < 2) {
    throw usage_error(fmt::format(
        "{} on rank {}: staged_options::slots is {}; at least 2 are needed (one segment copies "
        "while another is on the wire)",
        what, comm.rank(), opt.slots));
  }
}

std::size_t staged_segment(const staged_options& opt) {
  return opt.segment_bytes != 0 ? opt.segment_bytes : default_staged_segment_bytes;
}

}  // namespace

void staged_allreduce(const communicator& comm, const void* in, void* out, std::size_t in_count,
                      std::size_t out_count, dtype type, op_kind op, const staged_options& opt) {
  const char* what = "staged_allreduce";
  if (in_count != out_count) {
    throw usage_error(fmt::format("{} on rank {}: input has {} elements, output {}", what,
                                  comm.rank(), in_count, out_count));
  }
  const std::size_t bytes = in_count * dtype_size(type);
  if (in != out && detail::overlaps(in, bytes, out, bytes)) {
    throw usage_error(
        fmt::format("{} on rank {}: input and output overlap without being the same buffer", what,
                    comm.rank()));
  }
  require_device(comm, what, "in", in, in_count);
  require_device(comm, what, "out", out, out_count);
  require_slots(comm, what, opt);
  const ext::collective_call call(comm, coll_kind::allreduce, type, op, in_count);
  call.note_algorithm("staged_ring");
  if (in_count == 0) return;
  const std::size_t seg_bytes = staged_segment(opt);
  visit_dtype_op(type, op, [&]<class T, class Op>(type_tag<T>, Op) {
    const std::size_t seg = ext::segment_elems(seg_bytes, sizeof(T));
    device_ring_memory m(comm.raw(), ring_memory_mode::staged, seg * sizeof(T), opt.stream,
                         opt.slots);
    ext::ring_allreduce(m, comm.raw(), static_cast<const T*>(in), static_cast<T*>(out), in_count,
                        Op{}, seg_bytes);
  });
}

void staged_reduce_scatter(const communicator& comm, const void* in, void* out,
                           std::size_t in_count, std::size_t out_count, dtype type, op_kind op,
                           const staged_options& opt) {
  const char* what = "staged_reduce_scatter";
  const chunk own = partition(in_count, comm.size(), comm.rank());
  if (out_count != own.count) {
    throw usage_error(fmt::format(
        "{} on rank {}: output has {} elements but piece {} of {} elements over {} ranks has {} "
        "(see ringflow::partition)",
        what, comm.rank(), out_count, comm.rank(), in_count, comm.size(), own.count));
  }
  require_device(comm, what, "in", in, in_count);
  require_device(comm, what, "out", out, out_count);
  require_slots(comm, what, opt);
  const ext::collective_call call(comm, coll_kind::reduce_scatter, type, op, in_count);
  call.note_algorithm("staged_ring");
  if (in_count == 0) return;
  const std::size_t seg_bytes = staged_segment(opt);
  visit_dtype_op(type, op, [&]<class T, class Op>(type_tag<T>, Op) {
    const std::size_t seg = ext::segment_elems(seg_bytes, sizeof(T));
    device_ring_memory m(comm.raw(), ring_memory_mode::staged, seg * sizeof(T), opt.stream,
                         opt.slots);
    ext::ring_reduce_scatter(m, comm.raw(), static_cast<const T*>(in), static_cast<T*>(out),
                             in_count, Op{}, seg_bytes);
  });
}

void staged_allgather(const communicator& comm, const void* in, void* out, std::size_t in_count,
                      std::size_t out_count, dtype type, const staged_options& opt) {
  const char* what = "staged_allgather";
  const chunk own = partition(out_count, comm.size(), comm.rank());
  if (in_count != own.count) {
    throw usage_error(fmt::format(
        "{} on rank {}: input has {} elements but piece {} of {} elements over {} ranks has {} "
        "(see ringflow::partition)",
        what, comm.rank(), in_count, comm.rank(), out_count, comm.size(), own.count));
  }
  require_device(comm, what, "in", in, in_count);
  require_device(comm, what, "out", out, out_count);
  require_slots(comm, what, opt);
  const ext::collective_call call(comm, coll_kind::allgather, type, op_kind::sum, out_count);
  call.note_algorithm("staged_ring");
  if (out_count == 0) return;
  const std::size_t seg_bytes = staged_segment(opt);
  visit_dtype(type, [&]<class T>(type_tag<T>) {
    const std::size_t seg = ext::segment_elems(seg_bytes, sizeof(T));
    device_ring_memory m(comm.raw(), ring_memory_mode::staged, seg * sizeof(T), opt.stream,
                         opt.slots);
    ext::ring_allgather(m, comm.raw(), static_cast<const T*>(in), static_cast<T*>(out), out_count,
                        seg_bytes);
  });
}

void staged_broadcast(const communicator& comm, void* data, std::size_t count, dtype type, int root,
                      const staged_options& opt) {
  const char* what = "staged_broadcast";
  if (root < 0 || root >= comm.size()) {
    throw usage_error(fmt::format("{} on rank {}: root {} is outside [0, {})", what, comm.rank(),
                                  root, comm.size()));
  }
  require_device(comm, what, "data", data, count);
  const ext::collective_call call(comm, coll_kind::broadcast, type, op_kind::sum, count, root);
  call.note_algorithm("staged_ring");
  if (count == 0 || comm.size() == 1) return;
  // Windows of one segment through two pinned buffers: the root copies
  // window w+1 off the device while window w is broadcast; the others copy
  // window w onto the device while window w+1 arrives.
  transport& t = comm.raw();
  const std::size_t seg_bytes = staged_segment(opt);
  const std::size_t elem = dtype_size(type);
  const std::size_t window = std::max<std::size_t>(1, seg_bytes / elem) * elem;
  const std::size_t bytes = count * elem;
  staging_cache own_cache;
  staging_cache* c = t_cache.busy ? &own_cache : &t_cache;
  c->bind_device();
  c->busy = true;
  struct release {
    staging_cache* c;
    ~release() { c->busy = false; }
  } release_guard{c};
  if (!c->s) c->s.emplace();
  const cudaStream_t s = c->s->get();
  if (!c->start) c->start.emplace();
  c->start->record(opt.stream);
  c->start->wait_on(s);
  grow(c->send_blocks, 2 * window);
  grow_events(c->send_events, 2);
  auto buf = [&](std::size_t w) { return c->send_blocks.data() + (w % 2) * window; };
  auto* dev = static_cast<std::byte*>(data);
  const std::size_t windows = (bytes + window - 1) / window;
  auto len = [&](std::size_t w) { return std::min(window, bytes - w * window); };
  const bool is_root = comm.rank() == root;
  if (is_root) {
    RINGFLOW_CHECK_CUDA(cudaMemcpyAsync(buf(0), dev, len(0), cudaMemcpyDeviceToHost, s));
    c->send_events[0].record(s);
  }
  for (std::size_t w = 0; w < windows; ++w) {
    event& ev = c->send_events[w % 2];
    if (is_root) {
      ev.synchronize();  // window w is in pinned memory
      if (w + 1 < windows) {
        RINGFLOW_CHECK_CUDA(cudaMemcpyAsync(buf(w + 1), dev + (w + 1) * window, len(w + 1),
                                            cudaMemcpyDeviceToHost, s));
        c->send_events[(w + 1) % 2].record(s);
      }
    } else if (w >= 2) {
      ev.synchronize();  // window w-2's copy onto the device has read the buffer
    }
    ext::broadcast_bytes(t, buf(w), len(w), root, ringflow::default_segment_bytes);
    if (!is_root) {
      RINGFLOW_CHECK_CUDA(
          cudaMemcpyAsync(dev + w * window, buf(w), len(w), cudaMemcpyHostToDevice, s));
      ev.record(s);
    }
  }
  RINGFLOW_CHECK_CUDA(cudaStreamSynchronize(s));
}

}  // namespace detail

}  // namespace ringflow::cuda
