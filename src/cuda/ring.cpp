// The device memory policy of the ring (ringflow/cuda/ring.hpp) and the staged
// MPI collectives. Host code (the C++ compiler): it formats messages with fmt
// and drives the transport; the kernels are cuda::reduce / cuda::finish.
//
// The one rule that keeps the staged ring alive: the host never blocks on a
// single thing. Every wait polls (pump()): while it waits for a receive, a
// copy or a free slot it also posts the sends whose device->host copies have
// finished, frees the blocks of completed sends and starts the next copies.
// A blocking wait on one request could otherwise deadlock the ring: the
// neighbour's next segment may depend on a send of ours that is still
// waiting for its copy.
#include "ringflow/cuda/ring.hpp"

#include <cuda_runtime_api.h>
#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <deque>
#include <optional>
#include <thread>
#include <utility>

#include "ringflow/coll/broadcast.hpp"
#include "ringflow/coll/fingerprint.hpp"
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
  std::vector<event> send_events, slot_events, extra_events;
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
    slot_events.clear();
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

enum class send_state { queued, copying, posted, done };

struct pending_send {
  const void* dev_src = nullptr;  // staged: device bytes still to copy to a block
  const void* src = nullptr;      // what isend reads (pinned block, or device memory)
  std::size_t bytes = 0;
  int peer = 0;
  int tag = 0;
  const void* group = nullptr;  // the schedule's request vector (sources_read)
  int block = -1;               // staged send block held until the send completes
  int ev = -1;                  // event to wait for before posting (-1: none)
  send_state state = send_state::queued;
  request req;
};

}  // namespace

struct device_ring_memory::impl {
  transport& t;
  ring_memory_mode mode;
  std::size_t seg_bytes;
  std::size_t nslots;
  std::unique_ptr<staging_cache> own;  // when the thread's cache is in use
  staging_cache* c = nullptr;
  cudaStream_t s = nullptr;
  std::chrono::milliseconds timeout;

  std::deque<pending_send> q;
  std::size_t first_unposted = 0;  // q index: entries before it are posted or done
  std::size_t first_queued = 0;    // q index: entries from here have no copy started
  std::vector<int> free_blocks;
  std::vector<int> free_events;  // direct mode: extra_events not in use

  // Receive slots (reduce-scatter staging, staged allgather).
  std::size_t slot_bytes = 0;
  std::vector<request> recvs;
  std::vector<bool> slot_busy;  // a copy or kernel still reads the slot (slot_events)
  // Direct-mode allgather: every receive posted up front.
  std::vector<request> gathers;

  impl(transport& tr, ring_memory_mode m, std::size_t seg, cudaStream_t after, int slots)
      : t(tr), mode(m), seg_bytes(std::max<std::size_t>(seg, 1)),
        nslots(static_cast<std::size_t>(std::max(slots, 2))), timeout(tr.timeout()) {
    if (t_cache.busy) {
      own = std::make_unique<staging_cache>();
      c = own.get();
    } else {
      c = &t_cache;
    }
    c->bind_device();
    c->busy = true;
    if (!c->s) c->s.emplace();
    s = c->s->get();
    if (!c->start) c->start.emplace();
    // The input may still be being written on the caller's stream.
    c->start->record(after);
    c->start->wait_on(s);
    if (mode == ring_memory_mode::staged) {
      grow(c->send_blocks, nslots * seg_bytes);
      grow_events(c->send_events, nslots);
      for (std::size_t b = nslots; b-- > 0;) free_blocks.push_back(static_cast<int>(b));
    }
    for (int e = static_cast<int>(c->extra_events.size()); e-- > 0;) free_events.push_back(e);
  }

  ~impl() {
    // On an exception: let queued copies finish before the caller's buffers
    // may go away; pending requests wait (bounded by the timeout) as they
    // are destroyed.
    RINGFLOW_LOG_CUDA(cudaStreamSynchronize(s));
    c->busy = false;
  }

  int rank() const { return t.rank(); }
  int left() const { return ringflow::detail::ring_mod(t.rank() - 1, t.size()); }

  [[noreturn]] void timed_out(const std::string& what) const {
    throw timeout_error(fmt::format(
        "rank {}: device ring: {} did not complete within {} ms (RINGFLOW_TIMEOUT); is a "
        "neighbour stuck, dead or calling a different collective?",
        rank(), what, timeout.count()));
  }

  /// Polls `ready` while pumping the send queue; timeout_error after the
  /// transport's timeout.
  template <class Ready, class What>
  void wait_until(Ready&& ready, What&& what) {
    const auto deadline = ringflow::detail::deadline_after(timeout);
    for (unsigned spins = 0;; ++spins) {
      pump();
      if (ready()) return;
      if (spins >= 64) {
        std::this_thread::yield();
        if ((spins & 255u) == 0 && std::chrono::steady_clock::now() > deadline) timed_out(what());
      }
    }
  }

  bool event_done(cudaEvent_t e) const {
    const cudaError_t rc = cudaEventQuery(e);
    if (rc == cudaErrorNotReady) return false;
    RINGFLOW_CHECK_CUDA(rc);
    return true;
  }

  int take_event() {
    if (free_events.empty()) {
      c->extra_events.emplace_back();
      return static_cast<int>(c->extra_events.size()) - 1;
    }
    const int e = free_events.back();
    free_events.pop_back();
    return e;
  }

  void release(pending_send& p) {
    if (p.block >= 0) free_blocks.push_back(p.block);
    if (p.ev >= 0 && mode == ring_memory_mode::direct) free_events.push_back(p.ev);
    p.block = p.ev = -1;
    p.state = send_state::done;
  }

  /// One round of progress on the send queue, in queue order (sends to one
  /// peer with one tag must be posted in schedule order).
  void pump() {
    // Completed sends free their blocks and slots. Sends complete about in
    // the order they were posted: testing stops at the first pending one,
    // so a long queue (direct mode, small segments) costs O(1) per round.
    for (std::size_t i = 0; i < first_unposted; ++i) {
      pending_send& p = q[i];
      if (p.state != send_state::posted) continue;
      if (!p.req.test()) break;
      release(p);
    }
    while (!q.empty() && q.front().state == send_state::done) {
      q.pop_front();
      --first_unposted;
      --first_queued;
    }
    // Copies that finished: post their sends, in order.
    while (first_unposted < first_queued) {
      pending_send& p = q[first_unposted];
      if (p.ev >= 0) {
        const cudaEvent_t e = mode == ring_memory_mode::staged
                                  ? c->send_events[static_cast<std::size_t>(p.block)].get()
                                  : c->extra_events[static_cast<std::size_t>(p.ev)].get();
        if (!event_done(e)) break;
      }
      p.req = t.isend(p.src, p.bytes, p.peer, p.tag);
      p.state = send_state::posted;
      ++first_unposted;
    }
    // Start the copies of queued sends while send blocks are free.
    while (first_queued < q.size()) {
      pending_send& p = q[first_queued];
      if (p.dev_src != nullptr) {
        if (free_blocks.empty()) break;
        p.block = free_blocks.back();
        free_blocks.pop_back();
        void* block = c->send_blocks.data() + static_cast<std::size_t>(p.block) * seg_bytes;
        RINGFLOW_CHECK_CUDA(
            cudaMemcpyAsync(block, p.dev_src, p.bytes, cudaMemcpyDeviceToHost, s));
        c->send_events[static_cast<std::size_t>(p.block)].record(s);
        p.src = block;
        p.ev = p.block;
        p.dev_src = nullptr;
      }
      p.state = send_state::copying;
      ++first_queued;
    }
  }

  void enqueue(pending_send&& p) {
    q.push_back(std::move(p));
    pump();
  }

  void send(const void* src, std::size_t bytes, int peer, int tag, const void* group) {
    pending_send p;
    p.bytes = bytes;
    p.peer = peer;
    p.tag = tag;
    p.group = group;
    if (mode == ring_memory_mode::staged) {
      if (bytes > seg_bytes) {
        throw usage_error(fmt::format(
            "rank {}: device ring: a segment of {} bytes does not fit the {}-byte staging "
            "blocks (construct device_ring_memory with segment_elems x element size)",
            rank(), bytes, seg_bytes));
      }
      p.dev_src = src;
    } else {
      // The kernels that wrote src must be done before the transport reads it.
      p.src = src;
      p.ev = take_event();
      c->extra_events[static_cast<std::size_t>(p.ev)].record(s);
    }
    enqueue(std::move(p));
  }

  void sources_read(const void* group) {
    if (mode == ring_memory_mode::staged) {
      // The sources were read once their copies were queued on the stream:
      // later copies and kernels on the stream come after them.
      wait_until(
          [&] {
            for (std::size_t i = first_queued; i < q.size(); ++i) {
              if (q[i].group == group) return false;
            }
            return true;
          },
          [] { return std::string("copying the reduce-scatter sends off the device"); });
    } else {
      wait_until(
          [&] {
            for (const pending_send& p : q) {
              if (p.group == group && p.state != send_state::done) return false;
            }
            return true;
          },
          [] { return std::string("a reduce-scatter send"); });
    }
  }

  void complete() {
    wait_until([&] { return q.empty(); },
               [&] {
                 const pending_send& p = q.front();
                 return fmt::format("the send of {} bytes to rank {} (tag {})", p.bytes, p.peer,
                                    p.tag);
               });
    for (request& r : recvs) r.wait();
    for (request& r : gathers) r.wait();
    RINGFLOW_CHECK_CUDA(cudaStreamSynchronize(s));
  }

  void open_slots(std::size_t depth, std::size_t bytes) {
    if (depth > nslots) depth = nslots;  // recv_depth() said nslots
    slot_bytes = bytes;
    grow(c->dev_slots, nslots * bytes);
    if (mode == ring_memory_mode::staged) grow(c->recv_slots, nslots * bytes);
    grow_events(c->slot_events, nslots);
    recvs.resize(nslots);
    slot_busy.assign(nslots, false);
  }

  void* dev_slot(std::size_t k) const { return c->dev_slots.data() + k * slot_bytes; }
  void* host_slot(std::size_t k) const { return c->recv_slots.data() + k * slot_bytes; }

  /// Waits until nothing reads slot k any more (its copy or kernel is
  /// done). Depends on this GPU only, never on a neighbour: see forward.
  void wait_slot_free(std::size_t k) {
    wait_until(
        [&] {
          if (slot_busy[k]) {
            if (!event_done(c->slot_events[k])) return false;
            slot_busy[k] = false;
          }
          return true;
        },
        [&] { return fmt::format("freeing receive slot {}", k); });
  }

  void wait_recv(request& r, std::size_t bytes, int peer) {
    wait_until([&] { return r.test(); },
               [&] { return fmt::format("the receive of {} bytes from rank {}", bytes, peer); });
  }

  void mark_slot_read(std::size_t k) {
    c->slot_events[k].record(s);
    slot_busy[k] = true;
  }
};

device_ring_memory::device_ring_memory(transport& t, ring_memory_mode mode,
                                       std::size_t segment_bytes, cudaStream_t after, int slots)
    : impl_(std::make_unique<impl>(t, mode, segment_bytes, after, slots)) {}

device_ring_memory::~device_ring_memory() = default;

cudaStream_t device_ring_memory::stream() const noexcept { return impl_->s; }

void device_ring_memory::sources_read(std::vector<request>& sends) {
  impl_->sources_read(&sends);
}

void device_ring_memory::complete(std::vector<request>& sends) {
  // The policy keeps its requests itself; `sends` stays empty.
  wait_all(sends);
  impl_->complete();
}

std::size_t device_ring_memory::recv_depth() const noexcept { return impl_->nslots; }

void device_ring_memory::send_bytes(const void* src, std::size_t bytes, int peer, int tag,
                                    const void* group) {
  impl_->send(src, bytes, peer, tag, group);
}

void device_ring_memory::open_slots_bytes(std::size_t depth, std::size_t slot_bytes) {
  impl_->open_slots(depth, slot_bytes);
}

void device_ring_memory::post_recv_bytes(std::size_t k, std::size_t bytes, int peer, int tag) {
  impl& m = *impl_;
  m.wait_slot_free(k);
  void* into = m.mode == ring_memory_mode::staged ? m.host_slot(k) : m.dev_slot(k);
  m.recvs[k] = m.t.irecv(into, bytes, peer, tag);
}

void device_ring_memory::reduce_received_elems(std::size_t k, dtype type, op_kind op, void* dst,
                                               const void* mine, std::size_t n) {
  impl& m = *impl_;
  const std::size_t bytes = n * dtype_size(type);
  m.wait_recv(m.recvs[k], bytes, m.left());
  if (m.mode == ring_memory_mode::staged) {
    RINGFLOW_CHECK_CUDA(
        cudaMemcpyAsync(m.dev_slot(k), m.host_slot(k), bytes, cudaMemcpyHostToDevice, m.s));
  }
  // Same operand order as the CPU's reduce_inplace(dst, mine, received):
  // min/max return their first operand on ties and NaNs.
  cuda::reduce(type, op, dst, mine, m.dev_slot(k), n, m.s);
  m.mark_slot_read(k);
}

void device_ring_memory::finish_elems(dtype type, void* dst, std::size_t n, int p) {
  cuda::finish(type, op_kind::avg, dst, n, p, impl_->s);
}

std::size_t device_ring_memory::gather_depth(std::size_t units) {
  impl& m = *impl_;
  if (m.mode == ring_memory_mode::direct) {
    // Receives land straight in the output: post them all, like the CPU.
    m.gathers.resize(units);
    return units;
  }
  if (m.slot_bytes < m.seg_bytes) {
    // Allgather on its own: no reduce-scatter opened the slots.
    grow(m.c->recv_slots, m.nslots * m.seg_bytes);
    grow_events(m.c->slot_events, m.nslots);
    m.slot_bytes = m.seg_bytes;
    m.recvs.resize(m.nslots);
    m.slot_busy.assign(m.nslots, false);
  }
  return std::min(units, m.nslots);
}

void device_ring_memory::post_gather_bytes(std::size_t k, void* dst, std::size_t bytes, int peer,
                                           int tag) {
  impl& m = *impl_;
  if (m.mode == ring_memory_mode::direct) {
    m.gathers[k] = m.t.irecv(dst, bytes, peer, tag);
    return;
  }
  m.wait_slot_free(k);
  m.recvs[k] = m.t.irecv(m.host_slot(k), bytes, peer, tag);
}

void device_ring_memory::land_bytes(std::size_t k, void* dst, std::size_t bytes) {
  impl& m = *impl_;
  if (m.mode == ring_memory_mode::direct) {
    m.wait_recv(m.gathers[k], bytes, m.left());
    return;
  }
  m.wait_recv(m.recvs[k], bytes, m.left());
  RINGFLOW_CHECK_CUDA(cudaMemcpyAsync(dst, m.host_slot(k), bytes, cudaMemcpyHostToDevice, m.s));
  m.mark_slot_read(k);
}

void device_ring_memory::forward_bytes(std::size_t /*k*/, const void* dst, std::size_t bytes,
                                       int peer, int tag, const void* group) {
  impl& m = *impl_;
  if (m.mode == ring_memory_mode::staged) {
    // Sent again from the device copy, not from the pinned slot it arrived
    // in: a slot held until its forward completes makes the receive side
    // wait on the neighbour's progress, and with more segments per chunk
    // than slots plus blocks the ring then waits on itself (own-chunk sends
    // go first, fill every block, and need the neighbour's slots, which wait
    // on its own forwards...). Freed as soon as its copy is done, a slot
    // depends on this GPU only.
    m.send(dst, bytes, peer, tag, group);
    return;
  }
  pending_send p;
  p.bytes = bytes;
  p.peer = peer;
  p.tag = tag;
  p.group = group;
  p.src = dst;  // landed by the transport, written by no kernel of ours
  m.enqueue(std::move(p));
}

void device_ring_memory::copy_bytes(void* dst, const void* src, std::size_t bytes) {
  RINGFLOW_CHECK_CUDA(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, impl_->s));
}

void* device_ring_memory::partial_bytes(std::size_t bytes) {
  grow(impl_->c->partial, bytes);
  return impl_->c->partial.data();
}

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

bool overlap(const void* a, std::size_t na, const void* b, std::size_t nb) {
  const auto x = reinterpret_cast<std::uintptr_t>(a), y = reinterpret_cast<std::uintptr_t>(b);
  return na != 0 && nb != 0 && x < y + nb && y < x + na;
}

template <class F>
void with_type(dtype type, F&& f) {
  switch (type) {
    case dtype::f32: return f.template operator()<float>();
    case dtype::f64: return f.template operator()<double>();
    case dtype::i8: return f.template operator()<std::int8_t>();
    case dtype::u8: return f.template operator()<std::uint8_t>();
    case dtype::i32: return f.template operator()<std::int32_t>();
    case dtype::i64: return f.template operator()<std::int64_t>();
    case dtype::f16: return f.template operator()<half>();
    case dtype::bf16: return f.template operator()<bfloat16>();
  }
  throw usage_error("staged collective: unknown dtype");
}

template <class F>
void with_type_op(dtype type, op_kind op, F&& f) {
  with_type(type, [&]<class T>() {
    switch (op) {
      case op_kind::sum: return f.template operator()<T, sum_op>();
      case op_kind::prod: return f.template operator()<T, prod_op>();
      case op_kind::min: return f.template operator()<T, min_op>();
      case op_kind::max: return f.template operator()<T, max_op>();
      case op_kind::avg: return f.template operator()<T, avg_op>();
    }
    throw usage_error("staged collective: unknown reduce op");
  });
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
  if (in != out && overlap(in, bytes, out, bytes)) {
    throw usage_error(fmt::format(
        "{} on rank {}: input and output overlap without being the same buffer", what,
        comm.rank()));
  }
  require_device(comm, what, "in", in, in_count);
  require_device(comm, what, "out", out, out_count);
  require_slots(comm, what, opt);
  ringflow::detail::begin_collective(comm, coll_kind::allreduce, type, op, in_count);
  if (in_count == 0) return;
  const std::size_t seg_bytes = staged_segment(opt);
  with_type_op(type, op, [&]<class T, class Op>() {
    const std::size_t seg = ringflow::detail::segment_elems(seg_bytes, sizeof(T));
    device_ring_memory m(comm.raw(), ring_memory_mode::staged, seg * sizeof(T), opt.stream,
                         opt.slots);
    ringflow::detail::ring_allreduce_on(m, comm.raw(), static_cast<const T*>(in),
                                        static_cast<T*>(out), in_count, Op{}, seg_bytes);
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
  ringflow::detail::begin_collective(comm, coll_kind::reduce_scatter, type, op, in_count);
  if (in_count == 0) return;
  const std::size_t seg_bytes = staged_segment(opt);
  with_type_op(type, op, [&]<class T, class Op>() {
    const std::size_t seg = ringflow::detail::segment_elems(seg_bytes, sizeof(T));
    device_ring_memory m(comm.raw(), ring_memory_mode::staged, seg * sizeof(T), opt.stream,
                         opt.slots);
    ringflow::detail::ring_reduce_scatter_on(m, comm.raw(), static_cast<const T*>(in),
                                             static_cast<T*>(out), in_count, Op{}, seg_bytes);
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
  ringflow::detail::begin_collective(comm, coll_kind::allgather, type, op_kind::sum, out_count);
  if (out_count == 0) return;
  const std::size_t seg_bytes = staged_segment(opt);
  with_type(type, [&]<class T>() {
    const std::size_t seg = ringflow::detail::segment_elems(seg_bytes, sizeof(T));
    device_ring_memory m(comm.raw(), ring_memory_mode::staged, seg * sizeof(T), opt.stream,
                         opt.slots);
    ringflow::detail::ring_allgather_on(m, comm.raw(), static_cast<const T*>(in),
                                        static_cast<T*>(out), out_count, seg_bytes);
  });
}

void staged_broadcast(const communicator& comm, void* data, std::size_t count, dtype type,
                      int root, const staged_options& opt) {
  const char* what = "staged_broadcast";
  if (root < 0 || root >= comm.size()) {
    throw usage_error(fmt::format("{} on rank {}: root {} is outside [0, {})", what, comm.rank(),
                                  root, comm.size()));
  }
  require_device(comm, what, "data", data, count);
  ringflow::detail::begin_collective(comm, coll_kind::broadcast, type, op_kind::sum, count, root);
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
    ringflow::detail::broadcast_bytes(t, buf(w), len(w), root,
                                      ringflow::default_segment_bytes);
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
