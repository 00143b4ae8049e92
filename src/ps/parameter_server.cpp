// ps::node: the server loop (polls one header receive per worker, applies
// pushes with ad's optimizer math, answers pulls when the consistency model
// allows) and the worker side (nonblocking slices to and from every server).
#include "ringflow/ps/parameter_server.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <array>
#include <deque>
#include <limits>
#include <optional>

#include "core/trace_clock.hpp"
#include "ps/trace.hpp"
#include "ringflow/ad/parameter_store.hpp"
#include "ringflow/coll/collectives.hpp"
#include "ringflow/core/env.hpp"
#include "ringflow/core/log.hpp"

namespace ringflow::ps {

namespace {

using clock_type = std::chrono::steady_clock;

// Wire header (3 int64): kind, clock, spare. push: clock = the worker's
// pushes including this one; pull: the pushes it has done.
// sparse_push / sparse_pull: spare = the number of table rows that follow.
enum wire_kind : std::int64_t {
  wire_push = 1,
  wire_pull = 2,
  wire_goodbye = 3,
  wire_sparse_push = 4,
  wire_sparse_pull = 5
};
constexpr std::size_t header_words = 3;

// Backs off an idle polling loop: spin a little, then sleep up to 1 ms (the
// cores are shared with the ranks' compute).
class backoff {
 public:
  void idle() {
    if (++idle_ < 64) {
      std::this_thread::yield();
      return;
    }
    const auto us = std::min<long>(1000, 20L << std::min(idle_ / 64, 6));
    std::this_thread::sleep_for(std::chrono::microseconds(us));
  }
  void busy() { idle_ = 0; }

 private:
  int idle_ = 0;
};

// A piece of a shard: dense elements, or whole rows of one table.
struct segment {
  std::size_t begin = 0, end = 0;
  int table = -1;  // -1: dense
  std::size_t width = 0;
};

// The shard [r.begin, r.end) cut at the tables' edges (the layout keeps
// shard boundaries between rows, so a table piece holds whole rows).
std::vector<segment> segments_of(shard_range r, const std::vector<table_range>& tables) {
  std::vector<segment> out;
  std::size_t at = r.begin;
  for (std::size_t t = 0; t < tables.size() && at < r.end; ++t) {
    const auto& tb = tables[t];
    if (tb.end() <= at) continue;
    if (tb.offset >= r.end) break;
    if (tb.offset > at) out.push_back({at, tb.offset, -1, 0});
    const std::size_t b = std::max(at, tb.offset), e = std::min(r.end, tb.end());
    out.push_back({b, e, static_cast<int>(t), tb.width});
    at = e;
  }
  if (at < r.end) out.push_back({at, r.end, -1, 0});
  return out;
}

// A push as a server holds it until applied.
struct gradient {
  std::vector<float> dense;        // dense push: the whole shard; sparse: its dense segments packed
  std::vector<std::int64_t> rows;  // sparse: flat offsets of the rows' starts
  std::vector<float> row_values;   // sparse: those rows, in order
  bool sparse = false;
};

std::size_t dense_size(const std::vector<segment>& segs) {
  std::size_t n = 0;
  for (const auto& g : segs) {
    if (g.table < 0) n += g.end - g.begin;
  }
  return n;
}

// The segment holding element `i` (segments ascending, i inside one).
const segment& segment_at(const std::vector<segment>& segs, std::size_t i) {
  auto it = std::upper_bound(segs.begin(), segs.end(), i,
                             [](std::size_t x, const segment& g) { return x < g.begin; });
  return *(it - 1);
}

}  // namespace

std::string_view to_string(consistency c) noexcept {
  switch (c) {
    case consistency::sync: return "sync";
    case consistency::async: return "async";
    case consistency::ssp: return "ssp";
    case consistency::local_sgd: return "local";
  }
  return "?";
}

consistency parse_consistency(std::string_view name) {
  if (name == "sync") return consistency::sync;
  if (name == "async") return consistency::async;
  if (name == "ssp") return consistency::ssp;
  if (name == "local" || name == "local_sgd") return consistency::local_sgd;
  throw usage_error(
      fmt::format("ps: unknown consistency '{}'; use sync, async, ssp or local", name));
}

// ---------------------------------------------------------------- layout

layout::layout(std::size_t numel, int size, const options& o, int rank)
    : numel_(numel), size_(size), colocated_(o.where == placement::colocated) {
  if (colocated_) {
    servers_ = size;
    workers_ = size;
  } else {
    if (o.servers < 1 || o.servers >= size) {
      throw usage_error(fmt::format(
          "rank {}: ps: {} dedicated server(s) do not fit {} rank(s): need 1 <= servers < ranks "
          "(at least one worker); run more ranks or use placement::colocated",
          rank, o.servers, size));
    }
    servers_ = o.servers;
    workers_ = size - o.servers;
  }
  if (numel < static_cast<std::size_t>(servers_)) {
    throw usage_error(fmt::format(
        "rank {}: ps: {} parameter(s) cannot be split over {} servers (each needs at least one)",
        rank, numel, servers_));
  }
  if (o.mode == consistency::ssp && o.staleness < 0) {
    throw usage_error(fmt::format("rank {}: ps: staleness {} must be >= 0", rank, o.staleness));
  }
  if (o.mode == consistency::local_sgd && o.local_steps < 1) {
    throw usage_error(fmt::format("rank {}: ps: local_steps {} must be >= 1", rank, o.local_steps));
  }
  if (o.tag_base < 0 || o.tag_base + 2 > max_user_tag) {
    throw usage_error(fmt::format("rank {}: ps: tag_base {} must leave 3 user tags in [0, {}]",
                                  rank, o.tag_base, max_user_tag));
  }
  std::size_t prev_end = 0;
  for (std::size_t t = 0; t < o.tables.size(); ++t) {
    const auto& tb = o.tables[t];
    if (tb.rows == 0 || tb.width == 0 || tb.offset < prev_end || tb.end() > numel ||
        tb.rows * tb.width / tb.width != tb.rows) {
      throw usage_error(fmt::format(
          "rank {}: ps: table {} (offset {}, {} rows x {}) must have rows and width >= 1, lie "
          "inside the {} parameters and after table {} (tables ascending, disjoint)",
          rank, t, tb.offset, tb.rows, tb.width, numel,
          t == 0 ? std::string("-") : std::to_string(t - 1)));
    }
    prev_end = tb.end();
  }
  const auto S = static_cast<std::size_t>(servers_);
  bounds_.resize(S + 1);
  const std::size_t base = numel / S, extra = numel % S;
  for (std::size_t i = 0; i <= S; ++i) bounds_[i] = i * base + std::min(i, extra);
  // A boundary inside a table row moves back to the row's start, so every
  // row lives on one server.
  for (std::size_t i = 1; i < S; ++i) {
    for (const auto& tb : o.tables) {
      if (bounds_[i] > tb.offset && bounds_[i] < tb.end()) {
        bounds_[i] = tb.offset + (bounds_[i] - tb.offset) / tb.width * tb.width;
      }
    }
    if (bounds_[i] <= bounds_[i - 1]) {
      throw usage_error(fmt::format(
          "rank {}: ps: {} servers cannot each hold whole table rows of {} parameters (a row is "
          "wider than a shard); use fewer servers",
          rank, servers_, numel));
    }
  }
}

int layout::server_of(std::size_t i) const noexcept {
  const auto it = std::upper_bound(bounds_.begin(), bounds_.end(), i);
  return static_cast<int>(it - bounds_.begin()) - 1;
}

int layout::worker_index(int rank) const noexcept {
  if (rank < 0 || rank >= size_) return -1;
  if (colocated_) return rank;
  return rank >= servers_ ? rank - servers_ : -1;
}

shard_range layout::shard(int s) const noexcept {
  const auto i = static_cast<std::size_t>(s);
  return {bounds_[i], bounds_[i + 1]};
}

// ---------------------------------------------------------------- pending

pending::~pending() {
  // A destroyed pending push/pull still completes (its requests wait); a
  // failure is logged, never thrown.
  if (requests_.empty()) return;
  try {
    wait();
  } catch (const std::exception& e) {
    log::error("ps: a pending {} was destroyed and failed: {}", what_, e.what());
  }
}

void pending::wait() {
  const auto deadline = ringflow::detail::deadline_after(timeout_);
  backoff b;
  // Every open request is polled each round, so each server's span ends when
  // its own last request completed, not when an earlier server's did.
  std::vector<char> done(requests_.size(), 0);
  std::size_t left = requests_.size();
  while (left > 0) {
    bool progress = false;
    for (std::size_t i = 0; i < requests_.size(); ++i) {
      if (done[i]) continue;
      bool ok = false;
      try {
        ok = requests_[i].test();
      } catch (const std::exception& e) {
        const int server = peers_[i];
        // The rest fail alike (or complete); waited here, not logged by destructors.
        for (auto& r : requests_) {
          try {
            r.wait();
          } catch (const std::exception&) {}
        }
        requests_.clear();
        throw server_error(fmt::format("rank {}: ps {}: parameter server rank {} is gone: {}",
                                       rank_, what_, server, e.what()),
                           server);
      }
      if (!ok) continue;
      done[i] = 1;
      --left;
      progress = true;
      const auto s = static_cast<std::size_t>(peers_[i]);  // server index == server rank
      if (trace_ && s < open_by_server_.size() && --open_by_server_[s] == 0) {
        trace_->record(what_, detail::worker_lane(peers_[i]), start_us_,
                       ringflow::detail::trace::now_us(),
                       fmt::format("\"step\":{},\"server\":{},\"bytes\":{}", step_, peers_[i],
                                   bytes_by_server_[s]));
      }
    }
    if (left == 0) break;
    if (progress) {
      b.busy();
      continue;
    }
    if (clock_type::now() > deadline) {
      std::size_t first = 0;
      while (done[first]) ++first;
      const int server = peers_[first];
      // Left pending: their destructors wait out the transport's timeout.
      throw server_error(
          fmt::format("rank {}: ps {}: parameter server rank {} did not answer within {} ms "
                      "(ps::options::server_timeout); is it alive and serving?",
                      rank_, what_, server, timeout_.count()),
          server);
    }
    b.idle();
  }
  requests_.clear();
  for (auto& f : on_done_) f();
  on_done_.clear();
}

// ---------------------------------------------------------------- node

node::node(communicator comm, std::span<const float> initial, options o)
    : comm_(std::move(comm)), opts_(o), layout_(initial.size(), comm_.size(), o, comm_.rank()) {
  const int rank = comm_.rank();
  // Every rank must bring the same buffer size.
  std::array<std::int64_t, 2> n{static_cast<std::int64_t>(initial.size()),
                                -static_cast<std::int64_t>(initial.size())};
  allreduce(comm_, std::span<std::int64_t>(n), max);
  if (n[0] != -n[1]) {
    throw usage_error(fmt::format(
        "rank {}: ps::node: initial parameters have {} floats here, but between {} and {} on "
        "other ranks; every rank must pass the same buffer",
        rank, initial.size(), -n[1], n[0]));
  }
  server_index_ = layout_.server_index(rank);
  worker_index_ = layout_.worker_index(rank);
  if (server_index_ >= 0) {  // well-formed (empty) even when never served
    stats_.server = server_index_;
    stats_.pushes_by_worker.assign(static_cast<std::size_t>(layout_.workers()), 0);
    stats_.staleness.assign(staleness_buckets, 0);
  }
  workers_ = comm_.split(worker_index_ >= 0 ? 0 : -1, rank);
  std::filesystem::path trace_path = opts_.timeline_path;
  if (trace_path.empty()) {
    if (auto p = env::text("RINGFLOW_TIMELINE")) trace_path = *p;
  }
  if (!trace_path.empty()) {
    trace_ = std::make_shared<detail::trace_recorder>(
        rank, ringflow::detail::trace::rank_file(trace_path, rank),
        opts_.mode == consistency::local_sgd ? 0 : layout_.servers(), worker_index_ >= 0,
        server_index_ >= 0 && opts_.mode != consistency::local_sgd);
  }
  if (opts_.mode == consistency::local_sgd) return;  // no server traffic
  if (server_index_ >= 0) {
    const auto r = layout_.shard(server_index_);
    initial_shard_.assign(initial.begin() + static_cast<std::ptrdiff_t>(r.begin),
                          initial.begin() + static_cast<std::ptrdiff_t>(r.end));
  }
  if (o.where == placement::colocated) {
    if (!comm_.raw().concurrent_use_ok()) {
      throw usage_error(fmt::format(
          "rank {}: ps: placement::colocated serves on a second thread, which this transport "
          "({}) does not allow; initialise MPI with MPI_THREAD_MULTIPLE or use dedicated servers",
          rank, comm_.backend()));
    }
    server_thread_ = std::thread([this] {
      try {
        serve_loop();
      } catch (...) {
        server_failure_ = std::current_exception();
      }
    });
  }
}

node::~node() {
  if (server_thread_.joinable()) {
    if (!finished_) {
      try {
        finish();
      } catch (const std::exception& e) {
        log::error("ps: rank {}: finishing in the destructor failed: {}", comm_.rank(), e.what());
      }
    }
    if (server_thread_.joinable()) server_thread_.join();
  }
  // Silent workers' header receives (after the join: the server thread
  // writes them): they end when those workers do.
  for (auto& [buffer, r] : abandoned_) {
    try {
      r.wait();
    } catch (const std::exception&) {}
  }
  if (trace_ && trace_->dirty()) {
    try {
      trace_->write();
    } catch (const std::exception& e) {
      log::error("{}", e.what());
    }
  }
}

void node::write_timeline() {
  if (trace_) trace_->write();
}

std::filesystem::path node::timeline_file() const {
  return trace_ ? trace_->file() : std::filesystem::path();
}

void node::trace_pending(pending& p, double start_us, std::int64_t step,
                         const std::vector<std::uint64_t>* bytes) const {
  if (!trace_) return;
  const auto S = static_cast<std::size_t>(layout_.servers());
  p.trace_ = trace_;
  p.start_us_ = start_us;
  p.step_ = step;
  p.bytes_by_server_.assign(S, 0);
  p.open_by_server_.assign(S, 0);
  for (const int peer : p.peers_) ++p.open_by_server_[static_cast<std::size_t>(peer)];
  for (std::size_t s = 0; s < S; ++s) {
    const auto r = layout_.shard(static_cast<int>(s));
    // push: what it sent (header and slice); pull: the parameters it received.
    p.bytes_by_server_[s] = bytes != nullptr
                                ? (*bytes)[s]
                                : (p.what_ == "push" ? header_words * sizeof(std::int64_t) : 0) +
                                      r.size() * sizeof(float);
  }
}

void node::check_rows(const char* what, std::size_t tables) const {
  if (opts_.tables.empty()) {
    throw usage_error(fmt::format(
        "rank {}: ps::node::{}: no sparse tables (set ps::options::tables)", comm_.rank(), what));
  }
  if (tables != opts_.tables.size()) {
    throw usage_error(fmt::format("rank {}: ps::node::{}: rows for {} table(s), the job has {}",
                                  comm_.rank(), what, tables, opts_.tables.size()));
  }
}

// The flat offset of row `row` of table `t`, checked.
static std::size_t row_offset(const table_range& tb, std::size_t t, std::int64_t row, int rank,
                              const char* what) {
  if (row < 0 || static_cast<std::uint64_t>(row) >= tb.rows) {
    throw usage_error(fmt::format(
        "rank {}: ps::node::{}: row {} of table {} is outside [0, {}) (the table's rows)", rank,
        what, row, t, tb.rows));
  }
  return tb.offset + static_cast<std::size_t>(row) * tb.width;
}

pending node::push_sparse(std::span<const float> grads, std::span<const table_rows> rows) {
  check_worker("push_sparse", grads.size());
  check_rows("push_sparse", rows.size());
  const int rank = comm_.rank();
  const double t0 = trace_ ? ringflow::detail::trace::now_us() : 0.0;
  const int S = layout_.servers();
  const auto& tables = opts_.tables;
  // Each server's row offsets and row values, in the order given.
  std::vector<std::vector<std::int64_t>> offsets(static_cast<std::size_t>(S));
  std::vector<std::vector<float>> values(static_cast<std::size_t>(S));
  for (std::size_t t = 0; t < tables.size(); ++t) {
    const auto& tb = tables[t];
    if (rows[t].values.size() != rows[t].indices.size() * tb.width) {
      throw usage_error(fmt::format(
          "rank {}: ps::node::push_sparse: table {} gets {} row indices and {} values; {} rows of "
          "width {} need {}",
          rank, t, rows[t].indices.size(), rows[t].values.size(), rows[t].indices.size(), tb.width,
          rows[t].indices.size() * tb.width));
    }
    for (std::size_t k = 0; k < rows[t].indices.size(); ++k) {
      const std::size_t o = row_offset(tb, t, rows[t].indices[k], rank, "push_sparse");
      const auto s = static_cast<std::size_t>(layout_.server_of(o));
      offsets[s].push_back(static_cast<std::int64_t>(o));
      const float* v = rows[t].values.data() + k * tb.width;
      values[s].insert(values[s].end(), v, v + tb.width);
    }
  }
  pending p;
  p.rank_ = rank;
  p.what_ = "push";
  p.timeout_ = opts_.server_timeout;
  ++clock_;
  p.headers_.assign(header_words * static_cast<std::size_t>(S), 0);
  std::vector<std::uint64_t> bytes(static_cast<std::size_t>(S), 0);
  for (int s = 0; s < S; ++s) {
    const auto si = static_cast<std::size_t>(s);
    const int peer = layout_.server_rank(s);
    std::vector<float> dense;
    for (const auto& g : segments_of(layout_.shard(s), tables)) {
      if (g.table < 0)
        dense.insert(dense.end(), grads.begin() + static_cast<std::ptrdiff_t>(g.begin),
                     grads.begin() + static_cast<std::ptrdiff_t>(g.end));
    }
    std::span<std::int64_t> h(p.headers_.data() + header_words * si, header_words);
    h[0] = wire_sparse_push;
    h[1] = clock_;
    h[2] = static_cast<std::int64_t>(offsets[si].size());
    p.requests_.push_back(comm_.isend(std::span<const std::int64_t>(h), peer, opts_.tag_base));
    p.peers_.push_back(peer);
    bytes[si] = h.size_bytes() + dense.size() * sizeof(float);
    p.floats_.push_back(std::move(dense));
    p.requests_.push_back(
        comm_.isend(std::span<const float>(p.floats_.back()), peer, opts_.tag_base + 1));
    p.peers_.push_back(peer);
    if (!offsets[si].empty()) {
      bytes[si] += offsets[si].size() * sizeof(std::int64_t) + values[si].size() * sizeof(float);
      p.offsets_.push_back(std::move(offsets[si]));
      p.requests_.push_back(
          comm_.isend(std::span<const std::int64_t>(p.offsets_.back()), peer, opts_.tag_base + 1));
      p.peers_.push_back(peer);
      p.floats_.push_back(std::move(values[si]));
      p.requests_.push_back(
          comm_.isend(std::span<const float>(p.floats_.back()), peer, opts_.tag_base + 1));
      p.peers_.push_back(peer);
    }
    bytes_sent_ += bytes[si];
  }
  trace_pending(p, t0, clock_, &bytes);
  return p;
}

pending node::pull_sparse(std::span<float> params,
                          std::span<const std::span<const std::int64_t>> rows) {
  check_worker("pull_sparse", params.size());
  check_rows("pull_sparse", rows.size());
  const int rank = comm_.rank();
  const double t0 = trace_ ? ringflow::detail::trace::now_us() : 0.0;
  const int S = layout_.servers();
  const auto& tables = opts_.tables;
  std::vector<std::vector<std::int64_t>> offsets(static_cast<std::size_t>(S));
  std::vector<std::size_t> row_floats(static_cast<std::size_t>(S), 0);
  for (std::size_t t = 0; t < tables.size(); ++t) {
    for (const std::int64_t row : rows[t]) {
      const std::size_t o = row_offset(tables[t], t, row, rank, "pull_sparse");
      const auto s = static_cast<std::size_t>(layout_.server_of(o));
      offsets[s].push_back(static_cast<std::int64_t>(o));
      row_floats[s] += tables[t].width;
    }
  }
  pending p;
  p.rank_ = rank;
  p.what_ = "pull";
  p.timeout_ = opts_.server_timeout;
  p.headers_.assign(header_words * static_cast<std::size_t>(S), 0);
  std::vector<std::uint64_t> bytes(static_cast<std::size_t>(S), 0);
  // Replies first (posted before the requests, as pull() does): the dense
  // part, then the rows in the order asked; wait() scatters them.
  for (int s = 0; s < S; ++s) {
    const auto si = static_cast<std::size_t>(s);
    const int peer = layout_.server_rank(s);
    auto segs = segments_of(layout_.shard(s), tables);
    const std::size_t n = dense_size(segs) + row_floats[si];
    bytes[si] = n * sizeof(float);
    p.floats_.emplace_back(n);
    p.requests_.push_back(
        comm_.irecv(std::span<float>(p.floats_.back()), peer, opts_.tag_base + 2));
    p.peers_.push_back(peer);
    p.offsets_.push_back(std::move(offsets[si]));
    // The inner buffers stay where they are when floats_ grows or p moves.
    const float* reply = p.floats_.back().data();
    p.on_done_.push_back([params, reply, offs = p.offsets_.back(), segs = std::move(segs)] {
      std::size_t at = 0;
      for (const auto& g : segs) {
        if (g.table >= 0) continue;
        std::copy_n(reply + at, g.end - g.begin,
                    params.begin() + static_cast<std::ptrdiff_t>(g.begin));
        at += g.end - g.begin;
      }
      for (const std::int64_t o : offs) {
        const auto& g = segment_at(segs, static_cast<std::size_t>(o));
        std::copy_n(reply + at, g.width, params.begin() + o);
        at += g.width;
      }
    });
  }
  for (int s = 0; s < S; ++s) {
    const auto si = static_cast<std::size_t>(s);
    const int peer = layout_.server_rank(s);
    std::span<std::int64_t> h(p.headers_.data() + header_words * si, header_words);
    h[0] = wire_sparse_pull;
    h[1] = clock_;
    h[2] = static_cast<std::int64_t>(p.offsets_[si].size());
    p.requests_.push_back(comm_.isend(std::span<const std::int64_t>(h), peer, opts_.tag_base));
    p.peers_.push_back(peer);
    bytes_sent_ += h.size_bytes();
    if (!p.offsets_[si].empty()) {
      p.requests_.push_back(
          comm_.isend(std::span<const std::int64_t>(p.offsets_[si]), peer, opts_.tag_base + 1));
      p.peers_.push_back(peer);
      bytes_sent_ += p.offsets_[si].size() * sizeof(std::int64_t);
    }
  }
  trace_pending(p, t0, clock_, &bytes);
  return p;
}

void node::check_worker(const char* what, std::size_t n) const {
  if (worker_index_ < 0) {
    throw usage_error(fmt::format("rank {}: ps::node::{}: this rank is a server, not a worker",
                                  comm_.rank(), what));
  }
  if (finished_) {
    throw usage_error(fmt::format("rank {}: ps::node::{} after finish()", comm_.rank(), what));
  }
  if (opts_.mode == consistency::local_sgd) {
    throw usage_error(fmt::format(
        "rank {}: ps::node::{}: local SGD has no server traffic; step your own optimizer and "
        "call average()",
        comm_.rank(), what));
  }
  if (n != layout_.numel()) {
    throw usage_error(
        fmt::format("rank {}: ps::node::{}: buffer has {} floats, the servers hold {}",
                    comm_.rank(), what, n, layout_.numel()));
  }
}

pending node::pull(std::span<float> params) {
  check_worker("pull", params.size());
  const double t0 = trace_ ? ringflow::detail::trace::now_us() : 0.0;
  pending p;
  p.rank_ = comm_.rank();
  p.what_ = "pull";
  p.timeout_ = opts_.server_timeout;
  const int S = layout_.servers();
  p.headers_.assign(header_words * static_cast<std::size_t>(S), 0);
  for (int s = 0; s < S; ++s) {
    const auto r = layout_.shard(s);
    const int peer = layout_.server_rank(s);
    // The reply's receive is posted before the request, so the server's send
    // matches at once.
    p.requests_.push_back(comm_.irecv(params.subspan(r.begin, r.size()), peer, opts_.tag_base + 2));
    p.peers_.push_back(peer);
  }
  for (int s = 0; s < S; ++s) {
    std::span<std::int64_t> h(p.headers_.data() + header_words * static_cast<std::size_t>(s),
                              header_words);
    h[0] = wire_pull;
    h[1] = clock_;
    const int peer = layout_.server_rank(s);
    p.requests_.push_back(comm_.isend(std::span<const std::int64_t>(h), peer, opts_.tag_base));
    p.peers_.push_back(peer);
    bytes_sent_ += h.size_bytes();
  }
  trace_pending(p, t0, clock_);
  return p;
}

pending node::push(std::span<const float> grads) {
  check_worker("push", grads.size());
  const double t0 = trace_ ? ringflow::detail::trace::now_us() : 0.0;
  pending p;
  p.rank_ = comm_.rank();
  p.what_ = "push";
  p.timeout_ = opts_.server_timeout;
  ++clock_;
  const int S = layout_.servers();
  p.headers_.assign(header_words * static_cast<std::size_t>(S), 0);
  for (int s = 0; s < S; ++s) {
    std::span<std::int64_t> h(p.headers_.data() + header_words * static_cast<std::size_t>(s),
                              header_words);
    h[0] = wire_push;
    h[1] = clock_;
    const auto r = layout_.shard(s);
    const int peer = layout_.server_rank(s);
    p.requests_.push_back(comm_.isend(std::span<const std::int64_t>(h), peer, opts_.tag_base));
    p.peers_.push_back(peer);
    p.requests_.push_back(comm_.isend(grads.subspan(r.begin, r.size()), peer, opts_.tag_base + 1));
    p.peers_.push_back(peer);
    bytes_sent_ += h.size_bytes() + r.size() * sizeof(float);
  }
  trace_pending(p, t0, clock_);
  return p;
}

bool node::average(std::span<float> params, std::int64_t step) {
  if (worker_index_ < 0 || opts_.mode != consistency::local_sgd) {
    throw usage_error(fmt::format(
        "rank {}: ps::node::average: only workers of a local_sgd job average parameters",
        comm_.rank()));
  }
  if (params.size() != layout_.numel()) {
    throw usage_error(fmt::format("rank {}: ps::node::average: buffer has {} floats, expected {}",
                                  comm_.rank(), params.size(), layout_.numel()));
  }
  if ((step + 1) % opts_.local_steps != 0) return false;
  const double t0 = trace_ ? ringflow::detail::trace::now_us() : 0.0;
  allreduce(workers_, params, avg);
  bytes_sent_ += 2 * params.size_bytes();  // a ring sends about 2(W-1)/W of it
  if (trace_) {
    trace_->record("average", detail::worker_lane(0), t0, ringflow::detail::trace::now_us(),
                   fmt::format("\"step\":{},\"bytes\":{}", step, 2 * params.size_bytes()));
  }
  return true;
}

void node::finish() {
  if (finished_) return;
  if (worker_index_ < 0) {
    throw usage_error(
        fmt::format("rank {}: ps::node::finish: this rank is not a worker", comm_.rank()));
  }
  finished_ = true;
  if (opts_.mode != consistency::local_sgd) {
    std::vector<std::int64_t> headers(header_words * static_cast<std::size_t>(layout_.servers()),
                                      0);
    pending p;
    p.rank_ = comm_.rank();
    p.what_ = "finish";
    p.timeout_ = opts_.server_timeout;
    for (int s = 0; s < layout_.servers(); ++s) {
      std::span<std::int64_t> h(headers.data() + header_words * static_cast<std::size_t>(s),
                                header_words);
      h[0] = wire_goodbye;
      h[1] = clock_;
      p.requests_.push_back(
          comm_.isend(std::span<const std::int64_t>(h), layout_.server_rank(s), opts_.tag_base));
      p.peers_.push_back(layout_.server_rank(s));
    }
    p.headers_ = std::move(headers);  // the vector's buffer moves with it
    p.wait();
  }
  if (server_thread_.joinable()) {
    server_thread_.join();
    if (server_failure_) std::rethrow_exception(server_failure_);
  }
}

const server_stats& node::serve() {
  if (server_index_ < 0 || opts_.where == placement::colocated) {
    throw usage_error(fmt::format(
        "rank {}: ps::node::serve: only dedicated server ranks call serve() (colocated ranks "
        "serve on their own thread)",
        comm_.rank()));
  }
  if (served_) return stats_;
  served_ = true;
  if (opts_.mode != consistency::local_sgd) serve_loop();
  return stats_;
}

void node::gather_parameters(std::span<float> out) {
  if (out.size() != layout_.numel()) {
    throw usage_error(
        fmt::format("rank {}: ps::node::gather_parameters: buffer has {} floats, "
                    "expected {}",
                    comm_.rank(), out.size(), layout_.numel()));
  }
  if (opts_.mode == consistency::local_sgd) {
    std::vector<float> mine(out.size(), 0.0f);
    if (worker_index_ >= 0) std::copy(out.begin(), out.end(), mine.begin());
    allreduce(comm_, std::span<float>(mine), sum);
    const float w = static_cast<float>(layout_.workers());
    for (std::size_t i = 0; i < out.size(); ++i) out[i] = mine[i] / w;
    return;
  }
  std::vector<float> mine(out.size(), 0.0f);
  if (server_index_ >= 0) {
    const auto r = layout_.shard(server_index_);
    if (final_shard_.size() != r.size()) {
      throw usage_error(fmt::format(
          "rank {}: ps::node::gather_parameters: this server has not finished serving (call "
          "serve() or finish() first)",
          comm_.rank()));
    }
    std::copy(final_shard_.begin(), final_shard_.end(),
              mine.begin() + static_cast<std::ptrdiff_t>(r.begin));
  }
  // Exactly one rank contributes each element; the others add zeros.
  allreduce(comm_, std::span<float>(mine), sum);
  std::copy(mine.begin(), mine.end(), out.begin());
}

// ---------------------------------------------------------------- server

void node::serve_loop() {
  const int W = layout_.workers();
  const int tag = opts_.tag_base;
  const auto shard = layout_.shard(server_index_);
  const std::size_t n = shard.size();
  const consistency mode = opts_.mode;

  // The shard as ad parameters, one per segment, in order (so the store's
  // flat buffers are the shard's layout): dense pieces, and table pieces
  // [rows, width] with a sparse row gradient, which ad's optimizers update
  // lazily (only the rows named).
  const auto segs = segments_of(shard, opts_.tables);
  const std::size_t dense_n = dense_size(segs);
  std::vector<ad::sparse_rows_grad<float>*> row_grads(segs.size(), nullptr);
  ad::parameter_store<float> store;
  for (std::size_t i = 0; i < segs.size(); ++i) {
    const auto& g = segs[i];
    if (g.table < 0) {
      store.add(fmt::format("dense{}", i), ad::shape{static_cast<ad::index>(g.end - g.begin)});
      continue;
    }
    const auto rows = static_cast<ad::index>((g.end - g.begin) / g.width);
    auto t = store.add(fmt::format("table{}", i), ad::shape{rows, static_cast<ad::index>(g.width)});
    auto sg = std::make_shared<ad::sparse_rows_grad<float>>();
    sg->width = g.width;
    sg->rows = rows;
    sg->rank = comm_.rank();
    row_grads[i] = sg.get();
    t.node()->sparse = std::move(sg);
  }
  std::copy(initial_shard_.begin(), initial_shard_.end(), store.all_values().begin());
  std::optional<ad::sgd> sgd;
  std::optional<ad::adamw> adamw;
  if (opts_.optimizer.type == optimizer_options::kind::sgd) {
    sgd.emplace(store, opts_.optimizer.sgd);
  } else {
    adamw.emplace(store, opts_.optimizer.adamw);
  }
  const auto values = store.all_values();
  const auto grads = store.all_grads();
  detail::trace_recorder* const trace = trace_.get();
  const auto now_us = [] { return ringflow::detail::trace::now_us(); };
  const double loop_start_us = trace ? now_us() : 0.0;

  stats_ = server_stats{};
  stats_.server = server_index_;
  stats_.pushes_by_worker.assign(static_cast<std::size_t>(W), 0);
  stats_.staleness.assign(staleness_buckets, 0);

  struct peer {
    int rank = -1;
    std::vector<std::int64_t> header =
        std::vector<std::int64_t>(header_words, 0);  // heap: may outlive the loop
    request header_req;
    bool active = true;
    std::int64_t clock = 0;      // pushes received
    std::int64_t pull = -1;      // clock of the pull waiting for an answer, or -1
    double pull_arrived_us = 0;  // trace: when that pull's header was seen
    std::uint64_t pulled_at = 0;
    clock_type::time_point heard;
    std::deque<gradient> pushes;          // received, not applied
    std::vector<std::int64_t> pull_rows;  // a sparse pull's row offsets
    bool pull_sparse = false;
    std::vector<float> reply;
    request reply_req;
  };
  std::vector<peer> peers(static_cast<std::size_t>(W));
  int active = W;

  // A gradient's dense part, in the shard's layout, added into `out`
  // (a sparse push carries the dense segments packed; a dense one all n).
  const auto add_dense = [&](const gradient& g, std::span<float> out) {
    if (!g.sparse) {
      for (std::size_t i = 0; i < n; ++i) out[i] += g.dense[i];
      return;
    }
    std::size_t at = 0;
    for (const auto& sg : segs) {
      if (sg.table >= 0) continue;
      for (std::size_t i = sg.begin; i < sg.end; ++i) out[i - shard.begin] += g.dense[at++];
    }
  };
  // A gradient's table rows, appended to the tables' sparse gradients (a
  // dense push names every row).
  const auto add_rows = [&](const gradient& g) {
    if (row_grads.empty() || opts_.tables.empty()) return;
    if (!g.sparse) {
      for (std::size_t i = 0; i < segs.size(); ++i) {
        if (row_grads[i] == nullptr) continue;
        const auto& sg = segs[i];
        for (std::size_t o = sg.begin, r = 0; o < sg.end; o += sg.width, ++r) {
          row_grads[i]->add_row(static_cast<std::int64_t>(r), &g.dense[o - shard.begin]);
        }
      }
      return;
    }
    std::size_t at = 0;
    for (const std::int64_t o : g.rows) {
      const auto& sg = segment_at(segs, static_cast<std::size_t>(o));
      const auto i = static_cast<std::size_t>(&sg - segs.data());
      row_grads[i]->add_row(
          static_cast<std::int64_t>((static_cast<std::size_t>(o) - sg.begin) / sg.width),
          &g.row_values[at]);
      at += sg.width;
    }
  };
  const auto clear_rows = [&] {
    for (auto* r : row_grads) {
      if (r != nullptr) r->clear();
    }
  };
  // Row offsets from a worker: each the start of a row of this shard.
  const auto rows_ok = [&](const std::vector<std::int64_t>& offsets, std::size_t& floats) {
    floats = 0;
    for (const std::int64_t o : offsets) {
      if (o < static_cast<std::int64_t>(shard.begin) || o >= static_cast<std::int64_t>(shard.end))
        return false;
      const auto& sg = segment_at(segs, static_cast<std::size_t>(o));
      if (sg.table < 0 || (static_cast<std::size_t>(o) - sg.begin) % sg.width != 0) return false;
      floats += sg.width;
    }
    return true;
  };

  const auto post = [&](peer& p) {
    p.header_req = comm_.irecv(std::span<std::int64_t>(p.header), p.rank, tag);
  };
  const auto drop = [&](int w, const std::string& why, bool silent) {
    peer& p = peers[static_cast<std::size_t>(w)];
    if (!p.active) return;
    p.active = false;
    --active;
    p.pull = -1;
    if (silent) {
      // Kept by the node: its destructor waits for the worker to end.
      abandoned_.emplace_back(std::move(p.header), std::move(p.header_req));
    } else {
      try {
        p.header_req.wait();
      } catch (const std::exception&) {  // the failure that dropped it
      }
    }
    try {
      p.reply_req.wait();
    } catch (const std::exception&) {}
    stats_.dropped.push_back(p.rank);
    stats_.drop_reasons.push_back(why);
    stats_.record.push_back({event_kind::drop, w});
    log::warn("ps: server rank {} dropped worker rank {}: {}; {} worker(s) continue", comm_.rank(),
              p.rank, why, active);
  };
  // One optimizer step; the trace's "apply" span (from `start_us`: a sync
  // step's span includes summing the workers' gradients).
  const auto apply = [&](std::span<const float> g, double start_us, int worker, int gradients,
                         std::uint64_t stale) {
    std::copy(g.begin(), g.end(), grads.begin());
    if (sgd) {
      sgd->step();
    } else {
      adamw->step();
    }
    ++stats_.updates;
    if (trace) {
      trace->record("apply", detail::server_lane, start_us, now_us(),
                    fmt::format(R"("step":{},"worker":{},"gradients":{},"staleness":{})",
                                stats_.updates, worker, gradients, stale));
    }
  };
  std::vector<float> one(n, 0.0f);
  const auto apply_one = [&](int w) {
    const double t0 = trace ? now_us() : 0.0;
    peer& p = peers[static_cast<std::size_t>(w)];
    const std::uint64_t stale = stats_.updates - p.pulled_at;
    ++stats_.staleness[std::min<std::size_t>(stale, staleness_buckets - 1)];
    const gradient& g = p.pushes.front();
    clear_rows();
    add_rows(g);
    if (g.sparse) {
      std::fill(one.begin(), one.end(), 0.0f);
      add_dense(g, one);
      apply(one, t0, w, 1, stale);
    } else {
      apply(g.dense, t0, w, 1, stale);
    }
    p.pushes.pop_front();
    stats_.record.push_back({event_kind::apply, w});
  };
  const auto serve_pull = [&](int w) {
    peer& p = peers[static_cast<std::size_t>(w)];
    try {
      p.reply_req.wait();
    } catch (const std::exception& e) {
      drop(w, fmt::format("its last pull's reply failed: {}", e.what()), false);
      return;
    }
    const double t0 = trace ? now_us() : 0.0;
    if (p.pull_sparse) {
      // The dense segments packed, then the rows in the order asked.
      p.reply.clear();
      for (const auto& sg : segs) {
        if (sg.table < 0) {
          p.reply.insert(p.reply.end(), values.begin() + (sg.begin - shard.begin),
                         values.begin() + (sg.end - shard.begin));
        }
      }
      for (const std::int64_t o : p.pull_rows) {
        const auto& sg = segment_at(segs, static_cast<std::size_t>(o));
        const auto at = values.begin() + (static_cast<std::size_t>(o) - shard.begin);
        p.reply.insert(p.reply.end(), at, at + static_cast<std::ptrdiff_t>(sg.width));
      }
    } else {
      p.reply.assign(values.begin(), values.end());
    }
    p.reply_req = comm_.isend(std::span<const float>(p.reply), p.rank, tag + 2);
    ++stats_.pulls;
    stats_.bytes_sent += p.reply.size() * sizeof(float);
    if (trace) {
      // held_us: how long the pull waited here for the consistency model.
      trace->record(
          "serve", detail::server_lane, t0, now_us(),
          fmt::format(R"("step":{},"worker":{},"bytes":{},"held_us":{:.1f})", p.pull, w,
                      p.reply.size() * sizeof(float), std::max(0.0, t0 - p.pull_arrived_us)));
    }
    p.pulled_at = stats_.updates;
    p.pull = -1;
    p.heard = clock_type::now();  // it owes us nothing from here: silence counts again
    stats_.record.push_back({event_kind::serve, w});
  };

  const replay_record* replay = opts_.replay;
  const std::vector<replay_event>* script = nullptr;
  if (replay != nullptr && mode != consistency::sync) {
    if (replay->servers.size() != static_cast<std::size_t>(layout_.servers())) {
      throw usage_error(fmt::format("rank {}: ps: the replay record has {} server(s), this job {}",
                                    comm_.rank(), replay->servers.size(), layout_.servers()));
    }
    script = &replay->servers[static_cast<std::size_t>(server_index_)];
  }
  std::size_t next_event = 0;

  const auto now0 = clock_type::now();
  for (int w = 0; w < W; ++w) {
    peer& p = peers[static_cast<std::size_t>(w)];
    p.rank = layout_.worker_rank(w);
    p.heard = now0;
    post(p);
  }

  // Receives one header from worker w (already completed) and acts on it.
  const auto on_header = [&](int w) {
    peer& p = peers[static_cast<std::size_t>(w)];
    p.heard = clock_type::now();
    const std::int64_t kind = p.header[0];
    stats_.bytes_received += header_words * sizeof(std::int64_t);
    if (kind == wire_push) {
      gradient g;
      g.dense.resize(n);
      try {
        comm_.irecv(std::span<float>(g.dense), p.rank, tag + 1).wait();
      } catch (const std::exception& e) {
        drop(w, fmt::format("its gradient did not arrive: {}", e.what()), false);
        return;
      }
      p.clock = p.header[1];
      stats_.bytes_received += n * sizeof(float);
      ++stats_.pushes;
      ++stats_.pushes_by_worker[static_cast<std::size_t>(w)];
      p.pushes.push_back(std::move(g));
      // Live async/ssp: applied in arrival order (what the record keeps).
      if (script == nullptr && mode != consistency::sync) apply_one(w);
      post(p);
    } else if (kind == wire_sparse_push || kind == wire_sparse_pull) {
      const std::int64_t k = p.header[2];
      if (opts_.tables.empty() || k < 0 || static_cast<std::uint64_t>(k) > n) {
        drop(w,
             fmt::format("sent a sparse message of {} rows to a shard of {} floats{}", k, n,
                         opts_.tables.empty() ? " without tables" : ""),
             false);
        return;
      }
      gradient g;
      g.sparse = true;
      g.rows.resize(static_cast<std::size_t>(k));
      std::size_t floats = 0;
      try {
        if (kind == wire_sparse_push) {
          g.dense.resize(dense_n);
          comm_.irecv(std::span<float>(g.dense), p.rank, tag + 1).wait();
        }
        if (k > 0) comm_.irecv(std::span<std::int64_t>(g.rows), p.rank, tag + 1).wait();
        if (!rows_ok(g.rows, floats)) {
          drop(w,
               fmt::format("named a row outside this server's shard [{}, {}) or not at a table "
                           "row's start",
                           shard.begin, shard.end),
               false);
          return;
        }
        if (kind == wire_sparse_push && k > 0) {
          g.row_values.resize(floats);
          comm_.irecv(std::span<float>(g.row_values), p.rank, tag + 1).wait();
        }
      } catch (const std::exception& e) {
        drop(w, fmt::format("its sparse message did not arrive: {}", e.what()), false);
        return;
      }
      stats_.bytes_received += g.rows.size() * sizeof(std::int64_t);
      if (kind == wire_sparse_push) {
        stats_.bytes_received += (g.dense.size() + g.row_values.size()) * sizeof(float);
        p.clock = p.header[1];
        ++stats_.pushes;
        ++stats_.pushes_by_worker[static_cast<std::size_t>(w)];
        p.pushes.push_back(std::move(g));
        if (script == nullptr && mode != consistency::sync) apply_one(w);
      } else {
        p.pull = p.header[1];
        p.pull_rows = std::move(g.rows);
        p.pull_sparse = true;
        if (trace) p.pull_arrived_us = now_us();
      }
      post(p);
    } else if (kind == wire_pull) {
      p.pull = p.header[1];
      p.pull_sparse = false;
      if (trace) p.pull_arrived_us = now_us();
      post(p);
    } else if (kind == wire_goodbye) {
      p.active = false;
      --active;
      stats_.finished.push_back(p.rank);
    } else {
      drop(w, fmt::format("sent an unknown message kind {}", kind), false);
    }
  };

  // The consistency model's part: returns whether anything changed.
  const auto advance = [&]() -> bool {
    bool progress = false;
    if (script != nullptr && next_event < script->size()) {
      while (next_event < script->size()) {
        const replay_event e = (*script)[next_event];
        if (e.worker < 0 || e.worker >= W) {
          throw usage_error(fmt::format("rank {}: ps: replay record names worker {} of {}",
                                        comm_.rank(), e.worker, W));
        }
        peer& p = peers[static_cast<std::size_t>(e.worker)];
        if (e.kind == event_kind::apply && !p.pushes.empty()) {
          apply_one(e.worker);
        } else if (e.kind == event_kind::serve && p.pull >= 0) {
          serve_pull(e.worker);
        } else if (e.kind == event_kind::drop) {
          drop(e.worker, "dropped where the replayed run dropped it", true);
        } else {
          break;
        }
        ++next_event;
        progress = true;
      }
      return progress;
    }
    if (mode == consistency::sync) {
      for (;;) {
        // A step's participants: every worker still in, and any that left
        // with a gradient already received.
        int with = 0, without = 0;
        for (const auto& p : peers) {
          if (!p.pushes.empty()) {
            ++with;
          } else if (p.active) {
            ++without;
          }
        }
        if (with == 0 || without > 0) break;
        const double t0 = trace ? now_us() : 0.0;
        // Summed in worker order, then divided: the same on every run.
        // Table rows likewise: appended in worker order, coalesced (equal
        // rows summed in that order, as the dense sum adds them), divided.
        std::vector<float> total(n, 0.0f);
        clear_rows();
        for (int w = 0; w < W; ++w) {
          peer& p = peers[static_cast<std::size_t>(w)];
          if (p.pushes.empty()) continue;
          add_dense(p.pushes.front(), total);
          add_rows(p.pushes.front());
          p.pushes.pop_front();
          ++stats_.staleness[0];
          stats_.record.push_back({event_kind::apply, w});
        }
        const float count = static_cast<float>(with);
        for (auto& x : total) x /= count;
        for (auto* r : row_grads) {
          if (r == nullptr) continue;
          r->coalesce();
          for (auto& x : r->values) x /= count;
        }
        apply(total, t0, -1, with, 0);
        progress = true;
      }
      for (int w = 0; w < W; ++w) {
        peer& p = peers[static_cast<std::size_t>(w)];
        if (p.pull >= 0 && stats_.updates >= static_cast<std::uint64_t>(p.pull)) {
          serve_pull(w);
          progress = true;
        }
      }
      return progress;
    }
    std::int64_t slowest = std::numeric_limits<std::int64_t>::max();
    if (mode == consistency::ssp) {
      for (const auto& p : peers) {
        if (p.active) slowest = std::min(slowest, p.clock);
      }
    }
    for (int w = 0; w < W; ++w) {
      peer& p = peers[static_cast<std::size_t>(w)];
      if (p.pull < 0) continue;
      if (mode == consistency::ssp) {
        if (p.pull - slowest > opts_.staleness) continue;
        if (slowest != std::numeric_limits<std::int64_t>::max()) {
          stats_.max_clock_gap = std::max(stats_.max_clock_gap, p.pull - slowest);
        }
      }
      serve_pull(w);
      progress = true;
    }
    return progress;
  };

  backoff b;
  while (active > 0) {
    bool progress = false;
    for (int w = 0; w < W; ++w) {
      peer& p = peers[static_cast<std::size_t>(w)];
      if (!p.active) continue;
      bool got = false;
      try {
        got = p.header_req.test();
      } catch (const std::exception& e) {
        drop(w, e.what(), false);
        progress = true;
        continue;
      }
      if (got) {
        on_header(w);
        progress = true;
      }
    }
    if (advance()) progress = true;
    const auto now = clock_type::now();
    for (int w = 0; w < W; ++w) {
      peer& p = peers[static_cast<std::size_t>(w)];
      // Silent while owing us nothing (a held pull is our debt, not its).
      if (p.active && p.pull < 0 && now - p.heard > opts_.worker_timeout) {
        drop(w,
             fmt::format("silent for more than {} ms (ps::options::worker_timeout)",
                         opts_.worker_timeout.count()),
             true);
        progress = true;
      }
    }
    if (progress) {
      b.busy();
    } else {
      b.idle();
    }
  }
  // What is left from workers that finished: sync steps they completed.
  while (advance()) {}
  for (auto& p : peers) {
    try {
      p.reply_req.wait();
    } catch (const std::exception&) {  // a worker that left without its reply
    }
  }
  final_shard_.assign(values.begin(), values.end());
  if (trace) {
    // The server's load over the whole run, one span for the loop.
    const auto list = [](const auto& v) { return fmt::format("[{}]", fmt::join(v, ",")); };
    trace->record(
        "server load", detail::server_lane, loop_start_us, now_us(),
        fmt::format(R"("server":{},"updates":{},"pushes":{},"pulls":{},"bytes_received":{},)"
                    R"("bytes_sent":{},"pushes_by_worker":{},"staleness":{},"max_clock_gap":{},)"
                    R"("finished":{},"dropped":{})",
                    server_index_, stats_.updates, stats_.pushes, stats_.pulls,
                    stats_.bytes_received, stats_.bytes_sent, list(stats_.pushes_by_worker),
                    list(stats_.staleness), stats_.max_clock_gap, stats_.finished.size(),
                    stats_.dropped.size()));
  }
}

}  // namespace ringflow::ps
