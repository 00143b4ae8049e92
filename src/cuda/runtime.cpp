// CUDA error reporting and the RAII owners of ringflow/cuda/runtime.hpp (host code:
// compiled by the C++ compiler, so it may log through fmt).
#include "ringflow/cuda/runtime.hpp"

#include <cuda_runtime.h>

#include <atomic>
#include <cstdlib>
#include <string>

#include "ringflow/core/log.hpp"
#include "ringflow/cuda/check.hpp"

namespace ringflow::cuda {

namespace {
constexpr int rank_unset = -2;
std::atomic<int> g_error_rank{rank_unset};

int rank_from_environment() {
  for (const char* name : {"OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK"}) {
    if (const char* v = std::getenv(name); v != nullptr && *v != '\0') {
      char* end = nullptr;
      const long r = std::strtol(v, &end, 10);
      if (end != v && *end == '\0' && r >= 0) return static_cast<int>(r);
    }
  }
  return -1;
}
}  // namespace

int error_rank() noexcept {
  int r = g_error_rank.load(std::memory_order_relaxed);
  if (r == rank_unset) {
    r = rank_from_environment();
    g_error_rank.store(r, std::memory_order_relaxed);
  }
  return r;
}

void set_error_rank(int rank) noexcept { g_error_rank.store(rank, std::memory_order_relaxed); }

namespace detail {

std::string describe_failure(const char* api_error, const char* api_text, const char* call,
                             const char* file, int line) {
  const int r = error_rank();
  std::string who = r >= 0 ? "rank " + std::to_string(r) : std::string("rank ?");
  return who + ": " + call + " failed: " + api_text + " (" + api_error + ") [" + file + ":" +
         std::to_string(line) + "]";
}

void throw_cuda_error(cudaError_t code, const char* call, const char* file, int line) {
  // Clear a non-sticky error so the next unrelated call does not report it.
  cudaGetLastError();
  throw cuda_error(
      describe_failure(cudaGetErrorName(code), cudaGetErrorString(code), call, file, line), code);
}

void log_cuda_error(cudaError_t code, const char* call, const char* file, int line) noexcept {
  try {
    cudaGetLastError();
    ringflow::log::write(
        ringflow::log::level::error,
        describe_failure(cudaGetErrorName(code), cudaGetErrorString(code), call, file, line));
  } catch (...) {}
}

void* device_alloc(std::size_t bytes) {
  if (bytes == 0) return nullptr;
  void* p = nullptr;
  RINGFLOW_CHECK_CUDA(cudaMalloc(&p, bytes));
  return p;
}
void device_free(void* p) noexcept {
  if (p != nullptr) RINGFLOW_LOG_CUDA(cudaFree(p));
}
void* pinned_alloc(std::size_t bytes) {
  if (bytes == 0) return nullptr;
  void* p = nullptr;
  RINGFLOW_CHECK_CUDA(cudaMallocHost(&p, bytes));
  return p;
}
void pinned_free(void* p) noexcept {
  if (p != nullptr) RINGFLOW_LOG_CUDA(cudaFreeHost(p));
}

}  // namespace detail

stream::stream() { RINGFLOW_CHECK_CUDA(cudaStreamCreateWithFlags(&s_, cudaStreamNonBlocking)); }
stream& stream::operator=(stream&& o) noexcept {
  if (this != &o) {
    if (s_ != nullptr) RINGFLOW_LOG_CUDA(cudaStreamDestroy(s_));
    s_ = std::exchange(o.s_, nullptr);
  }
  return *this;
}
stream::~stream() {
  if (s_ != nullptr) RINGFLOW_LOG_CUDA(cudaStreamDestroy(s_));
}
void stream::synchronize() const { RINGFLOW_CHECK_CUDA(cudaStreamSynchronize(s_)); }

event::event(bool timing) {
  RINGFLOW_CHECK_CUDA(
      cudaEventCreateWithFlags(&e_, timing ? cudaEventDefault : cudaEventDisableTiming));
}
event& event::operator=(event&& o) noexcept {
  if (this != &o) {
    if (e_ != nullptr) RINGFLOW_LOG_CUDA(cudaEventDestroy(e_));
    e_ = std::exchange(o.e_, nullptr);
  }
  return *this;
}
event::~event() {
  if (e_ != nullptr) RINGFLOW_LOG_CUDA(cudaEventDestroy(e_));
}
void event::record(cudaStream_t s) { RINGFLOW_CHECK_CUDA(cudaEventRecord(e_, s)); }
bool event::query() const {
  const cudaError_t rc = cudaEventQuery(e_);
  if (rc == cudaErrorNotReady) return false;
  RINGFLOW_CHECK_CUDA(rc);
  return true;
}
void event::synchronize() const { RINGFLOW_CHECK_CUDA(cudaEventSynchronize(e_)); }
void event::wait_on(cudaStream_t s) const { RINGFLOW_CHECK_CUDA(cudaStreamWaitEvent(s, e_, 0)); }
float event::elapsed_ms(const event& start, const event& stop) {
  float ms = 0.0f;
  RINGFLOW_CHECK_CUDA(cudaEventElapsedTime(&ms, start.e_, stop.e_));
  return ms;
}

device_guard::device_guard(int device) {
  RINGFLOW_CHECK_CUDA(cudaGetDevice(&previous_));
  if (previous_ != device) RINGFLOW_CHECK_CUDA(cudaSetDevice(device));
}
device_guard::~device_guard() {
  int now = -1;
  if (cudaGetDevice(&now) == cudaSuccess && now != previous_ && previous_ >= 0) {
    RINGFLOW_LOG_CUDA(cudaSetDevice(previous_));
  }
}

memory_kind pointer_kind(const void* p) {
  cudaPointerAttributes attr{};
  RINGFLOW_CHECK_CUDA(cudaPointerGetAttributes(&attr, p));
  switch (attr.type) {
    case cudaMemoryTypeDevice: return memory_kind::device;
    case cudaMemoryTypeHost: return memory_kind::pinned;
    case cudaMemoryTypeManaged: return memory_kind::managed;
    default: return memory_kind::host;
  }
}

}  // namespace ringflow::cuda
