// MPI backend: nonblocking point-to-point on a duplicated communicator with
// MPI_ERRORS_RETURN; errors become comm_error naming the call, rank and peer.
#include "ringflow/backends/mpi.hpp"

#include <fmt/format.h>
#include <mpi.h>

#include <sched.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <thread>
#include <vector>

#include "ringflow/backends/mpi_interop.hpp"
#include "ringflow/core/error.hpp"
#include "ringflow/core/log.hpp"

namespace ringflow::mpi {
namespace {

std::string mpi_error_text(int code) {
  char text[MPI_MAX_ERROR_STRING];
  int len = 0;
  if (MPI_Error_string(code, text, &len) != MPI_SUCCESS) return fmt::format("MPI error {}", code);
  return std::string(text, static_cast<std::size_t>(len));
}

// The one checker for MPI calls: throws comm_error naming call, rank and peer.
#define RINGFLOW_CHECK_MPI(call, rank, peer)                                                  \
  do {                                                                                        \
    const int rf_rc_ = (call);                                                                \
    if (rf_rc_ != MPI_SUCCESS) {                                                              \
      throw comm_error(fmt::format("{} failed on rank {} (peer {}): {}", #call, (rank), (peer), \
                                   mpi_error_text(rf_rc_)));                                  \
    }                                                                                         \
  } while (0)

// Whether a waiting rank should yield its core while it polls. Spinning is
// fastest when every rank has a core; with more ranks than cores
// (--oversubscribe) a spinning rank starves the very rank it waits for.
// Decided once per process from the node's rank count (MPI_Comm_split_type)
// and the cores this process may run on; RINGFLOW_YIELD=0/1 overrides.
std::atomic<int> yield_when_idle{-1};

void decide_yield(MPI_Comm comm) {
  if (yield_when_idle.load() >= 0) return;
  if (const char* env = std::getenv("RINGFLOW_YIELD"); env != nullptr && *env != '\0') {
    yield_when_idle.store(std::string_view(env) == "0" ? 0 : 1);
    return;
  }
  // Cores = the union of the CPUs the node's ranks may run on: bind-to-core
  // gives each rank one CPU but the ranks still have one each, while taskset
  // or a container limits the union below the machine's core count.
  cpu_set_t mine;
  CPU_ZERO(&mine);
  if (sched_getaffinity(0, sizeof mine, &mine) != 0) {
    for (unsigned c = 0; c < std::thread::hardware_concurrency() && c < CPU_SETSIZE; ++c) {
      CPU_SET(c, &mine);
    }
  }
  MPI_Comm node = MPI_COMM_NULL;
  int local = 1;
  int cores = CPU_COUNT(&mine);
  if (MPI_Comm_split_type(comm, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &node) == MPI_SUCCESS) {
    MPI_Comm_size(node, &local);
    std::vector<cpu_set_t> all(static_cast<std::size_t>(local));
    if (MPI_Allgather(&mine, sizeof mine, MPI_BYTE, all.data(), sizeof mine, MPI_BYTE, node) ==
        MPI_SUCCESS) {
      cpu_set_t either;
      CPU_ZERO(&either);
      for (auto& s : all) CPU_OR(&either, &either, &s);
      cores = CPU_COUNT(&either);
    }
    MPI_Comm_free(&node);
  }
  yield_when_idle.store(local > cores ? 1 : 0);
  log::debug("mpi: {} ranks on this node, {} cores: {} while waiting", local, cores,
             local > cores ? "yielding" : "spinning");
}

// Messages larger than INT_MAX bytes go out as several MPI messages.
constexpr std::size_t max_piece = std::size_t{1} << 30;

class mpi_request final : public detail::request_state {
 public:
  mpi_request(std::vector<MPI_Request> reqs, std::vector<int> expected, int rank, int peer, int tag,
              std::size_t bytes, bool is_send, std::chrono::milliseconds timeout)
      : reqs_(std::move(reqs)), expected_(std::move(expected)), rank_(rank), peer_(peer),
        tag_(tag), bytes_(bytes), is_send_(is_send), timeout_(timeout) {}

  ~mpi_request() override {
    // Only reached for a request that failed or timed out: free what is left.
    for (auto& r : reqs_) {
      if (r != MPI_REQUEST_NULL) {
        MPI_Cancel(&r);
        MPI_Request_free(&r);
      }
    }
  }

  bool test() override {
    int flag = 0;
    std::vector<MPI_Status> st(reqs_.size());
    check(MPI_Testall(static_cast<int>(reqs_.size()), reqs_.data(), &flag, st.data()), st,
          "MPI_Testall");
    if (flag) verify_sizes(st);
    return flag != 0;
  }

  void wait() override {
    // Poll instead of MPI_Wait so a lost peer becomes timeout_error, not a
    // hang; yield between polls only when oversubscribed (decide_yield).
    const bool yield = yield_when_idle.load(std::memory_order_relaxed) == 1;
    const auto deadline = detail::deadline_after(timeout_);
    std::vector<MPI_Status> st(reqs_.size());
    for (unsigned spins = 0;; ++spins) {
      int flag = 0;
      check(MPI_Testall(static_cast<int>(reqs_.size()), reqs_.data(), &flag, st.data()), st,
            "MPI_Testall");
      if (flag) {
        verify_sizes(st);
        return;
      }
      if (spins >= 128) {
        if (yield) std::this_thread::yield();
        if ((spins & 1023u) == 0 && std::chrono::steady_clock::now() > deadline) {
          throw timeout_error(fmt::format(
              "rank {}: MPI {} {} bytes {} rank {} (tag {}) did not complete within {} ms "
              "(RINGFLOW_TIMEOUT); is rank {} stuck, dead or calling a different collective?",
              rank_, is_send_ ? "send of" : "receive of", bytes_, is_send_ ? "to" : "from", peer_,
              tag_, timeout_.count(), peer_));
        }
      }
    }
  }

 private:
  void check(int rc, const std::vector<MPI_Status>& st, const char* call) {
    if (rc == MPI_SUCCESS) return;
    int code = rc;
    if (rc == MPI_ERR_IN_STATUS) {
      for (const auto& s : st) {
        if (s.MPI_ERROR != MPI_SUCCESS && s.MPI_ERROR != MPI_ERR_PENDING) code = s.MPI_ERROR;
      }
    }
    int cls = 0;
    MPI_Error_class(code, &cls);
    if (cls == MPI_ERR_TRUNCATE) {
      throw comm_error(fmt::format(
          "rank {}: message from rank {} (tag {}) is larger than the {} bytes expected: the ranks "
          "disagree on the message size",
          rank_, peer_, tag_, bytes_));
    }
    throw comm_error(fmt::format("{} failed on rank {} ({} rank {}, tag {}, {} bytes): {}", call,
                                 rank_, is_send_ ? "send to" : "receive from", peer_, tag_, bytes_,
                                 mpi_error_text(code)));
  }

  void verify_sizes(const std::vector<MPI_Status>& st) {
    if (is_send_) return;
    for (std::size_t i = 0; i < st.size(); ++i) {
      int got = 0;
      MPI_Get_count(&st[i], MPI_BYTE, &got);
      if (got != expected_[i]) {
        throw comm_error(fmt::format(
            "rank {}: message from rank {} (tag {}) has {} bytes, expected {}: the ranks "
            "disagree on the message size",
            rank_, peer_, tag_, got, expected_[i]));
      }
    }
  }

  std::vector<MPI_Request> reqs_;
  std::vector<int> expected_;
  int rank_, peer_, tag_;
  std::size_t bytes_;
  bool is_send_;
  std::chrono::milliseconds timeout_;
};

class mpi_transport final : public transport {
 public:
  // Takes ownership of `comm` (a communicator ringflow created by dup/split).
  explicit mpi_transport(MPI_Comm comm) : comm_(comm) {
    MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN);
    MPI_Comm_rank(comm_, &rank_);
    MPI_Comm_size(comm_, &size_);
  }
  ~mpi_transport() override {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (!finalized && comm_ != MPI_COMM_NULL) MPI_Comm_free(&comm_);
  }

  int rank() const noexcept override { return rank_; }
  int size() const noexcept override { return size_; }
  std::string_view name() const noexcept override { return "mpi"; }
  MPI_Comm handle() const noexcept { return comm_; }

  request isend(const void* data, std::size_t bytes, int peer, int tag) override {
    return post(const_cast<void*>(data), bytes, peer, tag, true);
  }
  request irecv(void* data, std::size_t bytes, int peer, int tag) override {
    return post(data, bytes, peer, tag, false);
  }

  std::shared_ptr<transport> split(int color, int key) override {
    MPI_Comm out = MPI_COMM_NULL;
    RINGFLOW_CHECK_MPI(MPI_Comm_split(comm_, color < 0 ? MPI_UNDEFINED : color, key, &out), rank_,
                       -1);
    if (out == MPI_COMM_NULL) return nullptr;
    auto t = std::make_shared<mpi_transport>(out);
    t->set_timeout(timeout());
    return t;
  }

  bool concurrent_use_ok() const noexcept override {
    int provided = MPI_THREAD_SINGLE;
    MPI_Query_thread(&provided);
    return provided >= MPI_THREAD_MULTIPLE;
  }

  bool native_allreduce(const void* in, void* out, std::size_t count, dtype type,
                        op_kind op) override {
    MPI_Datatype mt;
    switch (type) {
      case dtype::f32: mt = MPI_FLOAT; break;
      case dtype::f64: mt = MPI_DOUBLE; break;
      case dtype::i8: mt = MPI_INT8_T; break;
      case dtype::u8: mt = MPI_UINT8_T; break;
      case dtype::i32: mt = MPI_INT32_T; break;
      case dtype::i64: mt = MPI_INT64_T; break;
      default: return false;  // MPI has no fp16/bf16
    }
    MPI_Op mo;
    switch (op) {
      case op_kind::sum:
      case op_kind::avg: mo = MPI_SUM; break;
      case op_kind::prod: mo = MPI_PROD; break;
      case op_kind::min: mo = MPI_MIN; break;
      case op_kind::max: mo = MPI_MAX; break;
      default: return false;
    }
    if (count > static_cast<std::size_t>(INT_MAX)) return false;
    const void* send = (in == out) ? MPI_IN_PLACE : in;
    RINGFLOW_CHECK_MPI(MPI_Allreduce(send, out, static_cast<int>(count), mt, mo, comm_), rank_, -1);
    return true;
  }

 private:
  request post(void* data, std::size_t bytes, int peer, int tag, bool is_send) {
    std::vector<MPI_Request> reqs;
    std::vector<int> expected;
    auto* p = static_cast<char*>(data);
    std::size_t left = bytes;
    do {  // a zero-byte message is still one message
      const std::size_t n = left < max_piece ? left : max_piece;
      MPI_Request r = MPI_REQUEST_NULL;
      if (is_send) {
        RINGFLOW_CHECK_MPI(MPI_Isend(p, static_cast<int>(n), MPI_BYTE, peer, tag, comm_, &r), rank_,
                           peer);
      } else {
        RINGFLOW_CHECK_MPI(MPI_Irecv(p, static_cast<int>(n), MPI_BYTE, peer, tag, comm_, &r), rank_,
                           peer);
      }
      reqs.push_back(r);
      expected.push_back(static_cast<int>(n));
      p += n;
      left -= n;
    } while (left > 0);
    return request(std::make_unique<mpi_request>(std::move(reqs), std::move(expected), rank_, peer,
                                                 tag, bytes, is_send, timeout()));
  }

  MPI_Comm comm_;
  int rank_ = 0;
  int size_ = 1;
};

constexpr int to_mpi(threading t) {
  switch (t) {
    case threading::single: return MPI_THREAD_SINGLE;
    case threading::funneled: return MPI_THREAD_FUNNELED;
    case threading::serialized: return MPI_THREAD_SERIALIZED;
    case threading::multiple: return MPI_THREAD_MULTIPLE;
  }
  return MPI_THREAD_FUNNELED;
}

threading from_mpi(int t) {
  if (t >= MPI_THREAD_MULTIPLE) return threading::multiple;
  if (t >= MPI_THREAD_SERIALIZED) return threading::serialized;
  if (t >= MPI_THREAD_FUNNELED) return threading::funneled;
  return threading::single;
}

std::terminate_handler previous_terminate = nullptr;

void abort_on_terminate() {
  std::string what = "unknown exception";
  if (auto e = std::current_exception()) {
    try {
      std::rethrow_exception(e);
    } catch (const std::exception& ex) {
      what = ex.what();
    } catch (...) {
    }
  } else {
    what = "std::terminate called";
  }
  abort(1, what);
}

}  // namespace

void environment::init(int* argc, char*** argv, threading level) {
  int already = 0;
  MPI_Initialized(&already);
  if (already) {
    int provided = 0;
    MPI_Query_thread(&provided);
    provided_ = from_mpi(provided);
    return;
  }
  int provided = 0;
  const int rc = MPI_Init_thread(argc, argv, to_mpi(level), &provided);
  if (rc != MPI_SUCCESS) throw comm_error("MPI_Init_thread failed: " + mpi_error_text(rc));
  owns_ = true;
  provided_ = from_mpi(provided);
  MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
  previous_terminate = std::set_terminate(abort_on_terminate);
}

environment::environment(int& argc, char**& argv, threading level) { init(&argc, &argv, level); }
environment::environment() { init(nullptr, nullptr, threading::multiple); }

environment::~environment() {
  if (!owns_) return;
  std::set_terminate(previous_terminate);
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized) MPI_Finalize();
}

bool initialized() noexcept {
  int init = 0, fin = 0;
  MPI_Initialized(&init);
  MPI_Finalized(&fin);
  return init && !fin;
}

void abort(int code, std::string_view why) noexcept {
  int rank = -1;
  if (initialized()) MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  std::fprintf(stderr, "[ringflow error] rank %d aborts the MPI job: %.*s\n", rank,
               static_cast<int>(why.size()), why.data());
  std::fflush(stderr);
  if (initialized()) MPI_Abort(MPI_COMM_WORLD, code);
  std::_Exit(code);
}

communicator from_comm(MPI_Comm comm) {
  if (!initialized()) {
    throw usage_error("ringflow::mpi: MPI is not initialized; create a ringflow::mpi::environment "
                      "(or call MPI_Init) first");
  }
  MPI_Comm dup = MPI_COMM_NULL;
  const int rc = MPI_Comm_dup(comm, &dup);
  if (rc != MPI_SUCCESS) throw comm_error("MPI_Comm_dup failed: " + mpi_error_text(rc));
  decide_yield(dup);
  return communicator(std::make_shared<mpi_transport>(dup));
}

communicator world() { return from_comm(MPI_COMM_WORLD); }

MPI_Comm native_handle(const communicator& comm) {
  auto* t = dynamic_cast<mpi_transport*>(&comm.raw());
  if (t == nullptr) {
    throw usage_error(fmt::format("mpi::native_handle: communicator uses the '{}' backend, not mpi",
                                  comm.backend()));
  }
  return t->handle();
}

}  // namespace ringflow::mpi
