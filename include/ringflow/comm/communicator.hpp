// communicator: a cheap, copyable handle on a transport, plus the per-group
// state collectives need (sequence number, checked mode) and the one home of
// the layers' per-communicator state (slot<T>).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>

#include "ringflow/comm/fingerprint.hpp"
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

  /// How the ranks check that they run the same collective (sequence
  /// number, collective, dtype, op, count, root): see check_mode. The
  /// default comes from RINGFLOW_CHECK (stamp when unset). Every rank of a
  /// communicator must use the same mode; split children inherit it.
  ringflow::check_mode check_mode() const noexcept;
  void set_check_mode(ringflow::check_mode m) const noexcept;
  /// checked(): the mode is not off. set_checked(true) selects the full
  /// exchange (check_mode::full), set_checked(false) turns checks off.
  bool checked() const noexcept { return check_mode() != check_mode::off; }
  void set_checked(bool on) const noexcept {
    set_check_mode(on ? check_mode::full : check_mode::off);
  }

  /// Number of collectives started on this communicator (same on every rank).
  std::uint64_t next_sequence() const noexcept;

  /// The per-communicator state of a layer above (the async engine, the
  /// tuning context, shm's segment): one T per communicator, shared by all
  /// of its copies, destroyed with the last. The first call makes it with
  /// `make()`, which returns a std::shared_ptr<T> (it may run collectives
  /// on this communicator and use other slots); later calls are one atomic
  /// load. Split children and other communicators over the same ranks have
  /// their own.
  /// @code
  ///   auto& engine = comm.slot<async_engine>([&] { return std::make_shared<async_engine>(...); });
  /// @endcode
  template <class T, class Make>
  T& slot(Make&& make) const {
    const int id = slot_id<T>();
    if (void* p = slot_find(id)) return *static_cast<T*>(p);
    return *static_cast<T*>(slot_make(id, [&]() -> std::shared_ptr<void> {
      std::shared_ptr<T> made = make();
      return made;
    }));
  }
  /// The T that slot<T>() made on this communicator, or nullptr.
  template <class T>
  T* find_slot() const noexcept {
    return static_cast<T*>(slot_find(slot_id<T>()));
  }

 private:
  struct state;
  void check_p2p(int peer, int tag, const char* what) const;

  // Slot ids: one small integer per type T, handed out on first use.
  static int next_slot_id();
  template <class T>
  static int slot_id() {
    static const int id = next_slot_id();
    return id;
  }
  void* slot_find(int id) const noexcept;
  void* slot_make(int id, const std::function<std::shared_ptr<void>()>& make) const;

  std::shared_ptr<transport> transport_;
  std::shared_ptr<state> state_;
};

}  // namespace ringflow
