// Nonblocking collectives: allreduce_async and friends return a handle; the
// work runs on a per-communicator progress thread over a private duplicate of
// the communicator, so it overlaps whatever the caller does meanwhile
// (typically the rest of backward).
#pragma once

#include <condition_variable>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <span>
#include <vector>

#include "ringflow/coll/collectives.hpp"

namespace ringflow {

namespace detail {
/// Completion state shared by a handle and the progress thread.
struct async_state {
  std::mutex mutex;
  std::condition_variable done_cv;
  bool done = false;
  std::exception_ptr error;
};

/// Queues `work(dup)` on the progress thread of `comm`, where `dup` is the
/// communicator's private duplicate. Operations run one at a time in the
/// order they were queued, which is the same on every rank.
std::shared_ptr<async_state> enqueue(const communicator& comm,
                                     std::function<void(const communicator&)> work);
}  // namespace detail

/// A pending nonblocking collective. Its buffers must stay valid and
/// untouched until wait() returns or test() is true. Destroying a pending
/// handle waits for it (and logs, never throws, if it failed).
class collective_handle {
 public:
  collective_handle() = default;
  explicit collective_handle(std::shared_ptr<detail::async_state> s) : state_(std::move(s)) {}
  collective_handle(collective_handle&&) noexcept = default;
  collective_handle& operator=(collective_handle&& other) noexcept;
  ~collective_handle();

  /// Blocks until the collective finished; rethrows its error.
  void wait();
  /// True when finished (then wait() returns at once); rethrows its error.
  bool test();
  bool valid() const noexcept { return static_cast<bool>(state_); }

 private:
  std::shared_ptr<detail::async_state> state_;
};

/// Nonblocking in-place allreduce: same result bits as the blocking call.
///
/// @code
/// auto h = ringflow::allreduce_async(comm, std::span(bucket), ringflow::avg);
/// ... // more backward
/// h.wait();
/// @endcode
template <element T, reduce_op Op = sum_op>
collective_handle allreduce_async(const communicator& comm, std::span<T> data, Op op = {},
                                  coll_options opt = {}) {
  return collective_handle(detail::enqueue(
      comm, [data, op, opt](const communicator& c) { allreduce(c, data, op, opt); }));
}

template <element T, reduce_op Op = sum_op>
collective_handle reduce_scatter_async(const communicator& comm,
                                       std::span<const std::type_identity_t<T>> in,
                                       std::span<T> out, Op op = {}, coll_options opt = {}) {
  return collective_handle(detail::enqueue(
      comm, [in, out, op, opt](const communicator& c) { reduce_scatter<T>(c, in, out, op, opt); }));
}

template <element T>
collective_handle allgather_async(const communicator& comm,
                                  std::span<const std::type_identity_t<T>> in, std::span<T> out,
                                  coll_options opt = {}) {
  return collective_handle(detail::enqueue(
      comm, [in, out, opt](const communicator& c) { allgather<T>(c, in, out, opt); }));
}

template <element T>
collective_handle broadcast_async(const communicator& comm, std::span<T> data, int root,
                                  coll_options opt = {}) {
  return collective_handle(detail::enqueue(
      comm, [data, root, opt](const communicator& c) { broadcast(c, data, root, opt); }));
}

/// Nonblocking alltoall, gather, scatter, reduce and "v" collectives: the
/// blocking call run on the progress thread (same results). The count and
/// displacement lists are copied; the data buffers must stay valid.
template <element T>
collective_handle alltoall_async(const communicator& comm,
                                 std::span<const std::type_identity_t<T>> in, std::span<T> out,
                                 alltoall_options opt = {}) {
  return collective_handle(detail::enqueue(
      comm, [in, out, opt](const communicator& c) { alltoall<T>(c, in, out, opt); }));
}

template <element T>
collective_handle alltoallv_async(const communicator& comm,
                                  std::span<const std::type_identity_t<T>> in,
                                  std::span<const std::size_t> send_counts,
                                  std::span<const std::size_t> send_displs, std::span<T> out,
                                  std::span<const std::size_t> recv_counts,
                                  std::span<const std::size_t> recv_displs) {
  using list = std::vector<std::size_t>;
  return collective_handle(detail::enqueue(
      comm, [in, out, sc = list(send_counts.begin(), send_counts.end()),
             sd = list(send_displs.begin(), send_displs.end()),
             rc = list(recv_counts.begin(), recv_counts.end()),
             rd = list(recv_displs.begin(), recv_displs.end())](const communicator& c) {
        alltoallv<T>(c, in, sc, sd, out, rc, rd);
      }));
}

template <element T>
collective_handle gather_async(const communicator& comm,
                               std::span<const std::type_identity_t<T>> in, std::span<T> out,
                               int root) {
  return collective_handle(detail::enqueue(
      comm, [in, out, root](const communicator& c) { gather<T>(c, in, out, root); }));
}

template <element T>
collective_handle scatter_async(const communicator& comm,
                                std::span<const std::type_identity_t<T>> in, std::span<T> out,
                                int root) {
  return collective_handle(detail::enqueue(
      comm, [in, out, root](const communicator& c) { scatter<T>(c, in, out, root); }));
}

template <element T, reduce_op Op = sum_op>
collective_handle reduce_async(const communicator& comm,
                               std::span<const std::type_identity_t<T>> in, std::span<T> out, Op op,
                               int root, coll_options opt = {}) {
  return collective_handle(detail::enqueue(comm, [in, out, op, root, opt](const communicator& c) {
    reduce<T, Op>(c, in, out, op, root, opt);
  }));
}

template <element T>
collective_handle allgatherv_async(const communicator& comm,
                                   std::span<const std::type_identity_t<T>> in, std::span<T> out,
                                   std::span<const std::size_t> counts,
                                   std::span<const std::size_t> displs) {
  using list = std::vector<std::size_t>;
  return collective_handle(
      detail::enqueue(comm, [in, out, n = list(counts.begin(), counts.end()),
                             d = list(displs.begin(), displs.end())](const communicator& c) {
        allgatherv<T>(c, in, out, n, d);
      }));
}

template <element T, reduce_op Op = sum_op>
collective_handle reduce_scatter_v_async(const communicator& comm,
                                         std::span<const std::type_identity_t<T>> in,
                                         std::span<T> out, std::span<const std::size_t> counts,
                                         Op op = {}) {
  using list = std::vector<std::size_t>;
  return collective_handle(detail::enqueue(
      comm, [in, out, op, n = list(counts.begin(), counts.end())](const communicator& c) {
        reduce_scatter_v<T, Op>(c, in, out, n, op);
      }));
}

/// Waits for every handle; rethrows the first error after waiting for all.
void wait_all(std::span<collective_handle> handles);

}  // namespace ringflow
