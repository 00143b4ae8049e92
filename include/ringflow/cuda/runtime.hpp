// Small RAII owners for CUDA resources: device and pinned host buffers,
// streams, events, and a guard that selects a device for a scope. All
// move-only; destructors release without throwing (a failure is logged).
//
// Needs the CUDA toolkit headers (see check.hpp).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <span>
#include <utility>

#include "ringflow/cuda/check.hpp"

namespace ringflow::cuda {

namespace detail {
void* device_alloc(std::size_t bytes);
void device_free(void* p) noexcept;
void* pinned_alloc(std::size_t bytes);
void pinned_free(void* p) noexcept;
}  // namespace detail

/// `n` elements of T in device memory (cudaMalloc; contents uninitialized).
template <class T>
class device_buffer {
 public:
  device_buffer() = default;
  explicit device_buffer(std::size_t n)
      : data_(static_cast<T*>(detail::device_alloc(n * sizeof(T)))), size_(n) {}
  device_buffer(device_buffer&& o) noexcept
      : data_(std::exchange(o.data_, nullptr)), size_(std::exchange(o.size_, 0)) {}
  device_buffer& operator=(device_buffer&& o) noexcept {
    if (this != &o) {
      detail::device_free(data_);
      data_ = std::exchange(o.data_, nullptr);
      size_ = std::exchange(o.size_, 0);
    }
    return *this;
  }
  device_buffer(const device_buffer&) = delete;
  device_buffer& operator=(const device_buffer&) = delete;
  ~device_buffer() { detail::device_free(data_); }

  T* data() noexcept { return data_; }
  const T* data() const noexcept { return data_; }
  std::size_t size() const noexcept { return size_; }
  std::size_t bytes() const noexcept { return size_ * sizeof(T); }
  /// A span over device memory: pass it on, never dereference it on the host.
  std::span<T> span() noexcept { return {data_, size_}; }
  std::span<const T> span() const noexcept { return {data_, size_}; }

 private:
  T* data_ = nullptr;
  std::size_t size_ = 0;
};

/// `n` elements of T in page-locked host memory (cudaMallocHost), the only
/// host memory cudaMemcpyAsync overlaps with kernels and other copies.
template <class T>
class pinned_buffer {
 public:
  pinned_buffer() = default;
  explicit pinned_buffer(std::size_t n)
      : data_(static_cast<T*>(detail::pinned_alloc(n * sizeof(T)))), size_(n) {}
  pinned_buffer(pinned_buffer&& o) noexcept
      : data_(std::exchange(o.data_, nullptr)), size_(std::exchange(o.size_, 0)) {}
  pinned_buffer& operator=(pinned_buffer&& o) noexcept {
    if (this != &o) {
      detail::pinned_free(data_);
      data_ = std::exchange(o.data_, nullptr);
      size_ = std::exchange(o.size_, 0);
    }
    return *this;
  }
  pinned_buffer(const pinned_buffer&) = delete;
  pinned_buffer& operator=(const pinned_buffer&) = delete;
  ~pinned_buffer() { detail::pinned_free(data_); }

  T* data() noexcept { return data_; }
  const T* data() const noexcept { return data_; }
  std::size_t size() const noexcept { return size_; }
  T& operator[](std::size_t i) noexcept { return data_[i]; }
  const T& operator[](std::size_t i) const noexcept { return data_[i]; }
  std::span<T> span() noexcept { return {data_, size_}; }

 private:
  T* data_ = nullptr;
  std::size_t size_ = 0;
};

/// A non-blocking stream (does not synchronize with the legacy default stream).
class stream {
 public:
  stream();
  stream(stream&& o) noexcept : s_(std::exchange(o.s_, nullptr)) {}
  stream& operator=(stream&& o) noexcept;
  stream(const stream&) = delete;
  stream& operator=(const stream&) = delete;
  ~stream();

  cudaStream_t get() const noexcept { return s_; }
  operator cudaStream_t() const noexcept { return s_; }
  /// Blocks the host until all work queued so far is done (checked).
  void synchronize() const;

 private:
  cudaStream_t s_ = nullptr;
};

/// An event; without timing by default (cheaper, for ordering only).
class event {
 public:
  explicit event(bool timing = false);
  event(event&& o) noexcept : e_(std::exchange(o.e_, nullptr)) {}
  event& operator=(event&& o) noexcept;
  event(const event&) = delete;
  event& operator=(const event&) = delete;
  ~event();

  cudaEvent_t get() const noexcept { return e_; }
  operator cudaEvent_t() const noexcept { return e_; }
  void record(cudaStream_t s);
  /// True once the work before record() is done (checked; never blocks).
  bool query() const;
  void synchronize() const;
  /// Makes `s` wait (on the device, the host does not block) for this event.
  void wait_on(cudaStream_t s) const;
  /// Milliseconds between two timing events, both complete.
  static float elapsed_ms(const event& start, const event& stop);

 private:
  cudaEvent_t e_ = nullptr;
};

/// Makes `device` current for the scope and restores the previous one.
class device_guard {
 public:
  explicit device_guard(int device);
  device_guard(const device_guard&) = delete;
  device_guard& operator=(const device_guard&) = delete;
  ~device_guard();

 private:
  int previous_ = -1;
};

/// Which memory a pointer is in (host, pinned host, device, managed).
enum class memory_kind { host, pinned, device, managed };
memory_kind pointer_kind(const void* p);

}  // namespace ringflow::cuda
