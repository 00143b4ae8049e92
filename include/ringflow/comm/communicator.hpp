// communicator: a cheap, copyable handle on a transport, plus the per-group
// state collectives need (sequence number, checked mode).
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include "ringflow/comm/transport.hpp"
#include "ringflow/core/dtype.hpp"
#include "ringflow/core/error.hpp"

namespace ringflow {

/// A group of ranks that talk through one transport. Copies share the same
/// group and state. Collectives on one communicator must be called in the same
/// order by every rank and not concurrently from several threads.
///
/// @code
/// ringflow::local::run(4, [](ringflow::communicator& c) {
///   std::vector<float> g(1000, float(c.rank()));
///   ringflow::allreduce(c, std::span(g), ringflow::sum);
/// });
/// @endcode
class communicator {
 public:
  communicator() = default;
  explicit communicator(std::shared_ptr<transport> t);

  int rank() const noexcept { return transport_->rank(); }
  int size() const noexcept { return transport_->size(); }
  bool valid() const noexcept { return static_cast<bool>(transport_); }
  transport& raw() const noexcept { return *transport_; }
  std::string_view backend() const noexcept { return transport_->name(); }

  /// Collective: splits into sub-communicators by color, ordered by (key, rank).
  /// A negative color returns an invalid communicator (valid() == false).
  communicator split(int color, int key) const;

  // Typed point-to-point. Tags must be in [0, max_user_tag].
  template <element T>
  request isend(std::span<const T> data, int peer, int tag) const {
    check_p2p(peer, tag, "isend");
    return transport_->isend(data.data(), data.size_bytes(), peer, tag);
  }
  template <element T>
  request irecv(std::span<T> data, int peer, int tag) const {
    check_p2p(peer, tag, "irecv");
    return transport_->irecv(data.data(), data.size_bytes(), peer, tag);
  }
  template <element T>
  void send(std::span<const T> data, int peer, int tag) const {
    isend(data, peer, tag).wait();
  }
  template <element T>
  void recv(std::span<T> data, int peer, int tag) const {
    irecv(data, peer, tag).wait();
  }

  /// Checked mode: before each collective the ranks compare a fingerprint
  /// (sequence number, collective, dtype, op, count, root) and a mismatch
  /// throws usage_error on every rank. On when RINGFLOW_CHECK=1.
  bool checked() const noexcept;
  void set_checked(bool on) const noexcept;

  /// Number of collectives started on this communicator (same on every rank).
  std::uint64_t next_sequence() const noexcept;

  /// Storage for the layers above (the async engine of coll/async.hpp),
  /// shared by all copies of this communicator and destroyed with the last.
  std::shared_ptr<void>& attachment() const noexcept;

 private:
  struct state;
  void check_p2p(int peer, int tag, const char* what) const;

  std::shared_ptr<transport> transport_;
  std::shared_ptr<state> state_;
};

/// True when RINGFLOW_CHECK is set to 1/on/true in the environment.
bool checked_by_default();

}  // namespace ringflow
