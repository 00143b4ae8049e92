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
enum wire_kind : std::int64_t { wire_push = 1, wire_pull = 2, wire_goodbye = 3 };
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
}

int layout::worker_index(int rank) const noexcept {
  if (rank < 0 || rank >= size_) return -1;
  if (colocated_) return rank;
  return rank >= servers_ ? rank - servers_ : -1;
}

shard_range layout::shard(int s) const noexcept {
  const auto S = static_cast<std::size_t>(servers_);
  const auto i = static_cast<std::size_t>(s);
  const std::size_t base = numel_ / S, extra = numel_ % S;
  const std::size_t begin = i * base + std::min(i, extra);
  return {begin, begin + base + (i < extra ? 1 : 0)};
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

void node::trace_pending(pending& p, double start_us, std::int64_t step) const {
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
    p.bytes_by_server_[s] =
        (p.what_ == "push" ? header_words * sizeof(std::int64_t) : 0) + r.size() * sizeof(float);
  }
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

  ad::parameter_store<float> store;
  store.add("shard", ad::shape{static_cast<ad::index>(n)});
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
    std::deque<std::vector<float>> pushes;  // received, not applied
    std::vector<float> reply;
    request reply_req;
  };
  std::vector<peer> peers(static_cast<std::size_t>(W));
  int active = W;

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
  const auto apply_one = [&](int w) {
    const double t0 = trace ? now_us() : 0.0;
    peer& p = peers[static_cast<std::size_t>(w)];
    const std::uint64_t stale = stats_.updates - p.pulled_at;
    ++stats_.staleness[std::min<std::size_t>(stale, staleness_buckets - 1)];
    apply(p.pushes.front(), t0, w, 1, stale);
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
    p.reply.assign(values.begin(), values.end());
    p.reply_req = comm_.isend(std::span<const float>(p.reply), p.rank, tag + 2);
    ++stats_.pulls;
    stats_.bytes_sent += n * sizeof(float);
    if (trace) {
      // held_us: how long the pull waited here for the consistency model.
      trace->record("serve", detail::server_lane, t0, now_us(),
                    fmt::format(R"("step":{},"worker":{},"bytes":{},"held_us":{:.1f})", p.pull, w,
                                n * sizeof(float), std::max(0.0, t0 - p.pull_arrived_us)));
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
      std::vector<float> g(n);
      try {
        comm_.irecv(std::span<float>(g), p.rank, tag + 1).wait();
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
    } else if (kind == wire_pull) {
      p.pull = p.header[1];
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
        std::vector<float> total(n, 0.0f);
        for (int w = 0; w < W; ++w) {
          peer& p = peers[static_cast<std::size_t>(w)];
          if (p.pushes.empty()) continue;
          const auto& g = p.pushes.front();
          for (std::size_t i = 0; i < n; ++i) total[i] += g[i];
          p.pushes.pop_front();
          ++stats_.staleness[0];
          stats_.record.push_back({event_kind::apply, w});
        }
        const float count = static_cast<float>(with);
        for (auto& x : total) x /= count;
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
