// ringflow-bench peer: Gloo's allreduces (ring, ring-chunked, halving-doubling) on a TCP loopback
// context.
#include "gloo_peer.hpp"

#include <fmt/format.h>
#include <mpi.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <filesystem>
#include <limits>
#include <system_error>

#include "ringflow/core/error.hpp"

#ifdef RINGFLOW_BENCH_HAS_GLOO
#include <gloo/algorithm.h>
#include <gloo/allreduce_halving_doubling.h>
#include <gloo/allreduce_ring.h>
#include <gloo/allreduce_ring_chunked.h>
#include <gloo/rendezvous/context.h>
#include <gloo/rendezvous/file_store.h>
#include <gloo/transport/tcp/device.h>
#endif

namespace ringflow::bench {

#ifdef RINGFLOW_BENCH_HAS_GLOO

struct gloo_peer::state {
  std::shared_ptr<gloo::Context> context;
  // One per name, rebuilt by prepare() for each size.
  std::vector<std::unique_ptr<gloo::Algorithm>> algorithms;
};

namespace {

// Rank 0 makes the directory, everyone learns its name.
std::string shared_temp_dir(MPI_Comm mpi, int rank) {
  char path[4096] = {};
  if (rank == 0) {
    std::error_code ec;
    const std::string base = std::filesystem::temp_directory_path(ec).string();
    std::string templ = (ec ? std::string("/tmp") : base) + "/ringflow-gloo-XXXXXX";
    if (mkdtemp(templ.data()) != nullptr && templ.size() < sizeof path) {
      std::memcpy(path, templ.c_str(), templ.size());
    }
  }
  MPI_Bcast(path, sizeof path, MPI_CHAR, 0, mpi);
  if (path[0] == '\0') {
    throw comm_error(
        "ringflow-bench: rank 0 could not create a temporary directory for Gloo's "
        "FileStore rendezvous; set TMPDIR to a writable directory on this machine");
  }
  return path;
}

}  // namespace

gloo_peer::gloo_peer(MPI_Comm mpi, dtype type, op_kind op) {
  if (type != dtype::f32 || op != op_kind::sum) {
    skip_reason_ = "Gloo peers run for float sum only (-d float -o sum)";
    return;
  }
  int rank = 0, size = 0;
  MPI_Comm_rank(mpi, &rank);
  MPI_Comm_size(mpi, &size);
  const std::string dir = shared_temp_dir(mpi, rank);
  // Connect on every rank, then agree on the outcome before anyone throws,
  // so a failure on one rank does not leave the others waiting.
  std::string failure;
  auto st = std::make_unique<state>();
  try {
    gloo::transport::tcp::attr attr("127.0.0.1");
    auto device = gloo::transport::tcp::CreateDevice(attr);
    gloo::rendezvous::FileStore store(dir);
    auto context = std::make_shared<gloo::rendezvous::Context>(rank, size);
    context->connectFullMesh(store, device);
    st->context = std::move(context);
  } catch (const std::exception& e) {
    failure = e.what();
  }
  int ok = failure.empty() ? 1 : 0, all_ok = 0;
  MPI_Allreduce(&ok, &all_ok, 1, MPI_INT, MPI_MIN, mpi);
  MPI_Barrier(mpi);
  if (rank == 0) {
    std::error_code ec;
    std::filesystem::remove_all(dir, ec);  // best effort: only rendezvous keys live there
  }
  if (!all_ok) {
    throw comm_error(fmt::format(
        "ringflow-bench: connecting Gloo's TCP context on 127.0.0.1 failed ({} on rank {}); "
        "check that loopback TCP works, or build without Gloo (-DRINGFLOW_BENCH_WITH_GLOO=OFF)",
        failure.empty() ? "on another rank" : failure, rank));
  }
  state_ = std::move(st);
  names_ = {"gloo_ring", "gloo_ring_chunked", "gloo_halv_dbl"};
}

gloo_peer::~gloo_peer() = default;

bool gloo_peer::runs(const std::string& name) const {
  return std::find(names_.begin(), names_.end(), name) != names_.end();
}

void gloo_peer::prepare(const bench_buffers& b) {
  if (!state_) return;
  if (b.shape.total > static_cast<std::size_t>(std::numeric_limits<int>::max())) {
    throw usage_error(
        fmt::format("ringflow-bench: Gloo counts are int; {} elements is too many "
                    "(lower -e)",
                    b.shape.total));
  }
  const int count = static_cast<int>(b.shape.total);
  std::vector<float*> ptrs{static_cast<float*>(b.recv)};
  auto& algs = state_->algorithms;
  algs.clear();  // old ones first: their buffers hold slots on the pairs
  // Same order on every rank: each constructor takes the context's next slots.
  algs.push_back(std::make_unique<gloo::AllreduceRing<float>>(state_->context, ptrs, count));
  algs.push_back(std::make_unique<gloo::AllreduceRingChunked<float>>(state_->context, ptrs, count));
  algs.push_back(
      std::make_unique<gloo::AllreduceHalvingDoubling<float>>(state_->context, ptrs, count));
}

void gloo_peer::run(const std::string& name, const bench_buffers& b) {
  const auto it = std::find(names_.begin(), names_.end(), name);
  const auto i = static_cast<std::size_t>(it - names_.begin());
  if (it == names_.end() || !state_ || i >= state_->algorithms.size()) {
    throw usage_error(fmt::format("ringflow-bench: Gloo peer '{}' is not prepared", name));
  }
  std::memcpy(b.recv, b.send, b.shape.total * sizeof(float));
  state_->algorithms[i]->run();
}

#else  // !RINGFLOW_BENCH_HAS_GLOO

struct gloo_peer::state {};

gloo_peer::gloo_peer(MPI_Comm, dtype, op_kind)
    : skip_reason_("built without Gloo (install libgloo-dev and reconfigure)") {}
gloo_peer::~gloo_peer() = default;
bool gloo_peer::runs(const std::string&) const { return false; }
void gloo_peer::prepare(const bench_buffers&) {}
void gloo_peer::run(const std::string& name, const bench_buffers&) {
  throw not_supported_error(fmt::format("ringflow-bench: '{}' needs Gloo; {}", name, skip_reason_));
}

#endif

}  // namespace ringflow::bench
