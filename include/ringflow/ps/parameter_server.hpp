// ps::node: a parameter server over the existing transport. A flat float
// buffer is range-partitioned over S server ranks; W worker ranks push
// gradient slices and pull parameter slices with nonblocking requests; the
// servers apply the optimizer (ad::sgd / ad::adamw math) to their shard.
// Consistency: synchronous, asynchronous, bounded staleness SSP(s), or local
// SGD (H local steps, then a parameter average by allreduce over the workers).
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <filesystem>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include "ringflow/ad/optim.hpp"
#include "ringflow/comm/communicator.hpp"
#include "ringflow/core/error.hpp"

namespace ringflow::ps {

namespace detail {
class trace_recorder;
}

/// Where the servers run. dedicated: ranks 0..servers-1 only serve, the rest
/// only work. colocated: every rank serves its shard (on a thread of its own)
/// and works.
enum class placement { dedicated, colocated };

/// sync: a step's update is the average of every live worker's gradient of
/// that step, and a pull after push t sees update t (equal to allreduce-
/// average SGD). async: each push is applied as it arrives; pulls are answered
/// at once. ssp: as async, but a pull of a worker that has pushed c times is
/// held until every live worker has pushed at least c - staleness times.
/// local_sgd: no server traffic; workers step their own optimizer and
/// average parameters every local_steps steps (allreduce over the workers).
enum class consistency { sync, async, ssp, local_sgd };

std::string_view to_string(consistency c) noexcept;
/// "sync", "async", "ssp" or "local"; usage_error otherwise.
consistency parse_consistency(std::string_view name);

/// The servers' optimizer: ad's SGD (momentum, Nesterov, weight decay) or AdamW.
struct optimizer_options {
  enum class kind { sgd, adamw };
  kind type = kind::sgd;
  ad::sgd_options sgd{.lr = 0.05, .momentum = 0.9};
  ad::adamw_options adamw{};
};

/// What one server did, in order (async and ssp runs; a replay follows it).
enum class event_kind : std::uint8_t { apply, serve, drop };
struct replay_event {
  event_kind kind = event_kind::apply;
  int worker = -1;  ///< worker index (0..W-1)
  bool operator==(const replay_event&) const = default;
};
/// Every server's event order, indexed by server index (0..S-1).
struct replay_record {
  std::vector<std::vector<replay_event>> servers;
};

/// A table of `rows` rows of `width` floats in the flat buffer, from
/// `offset` (an embedding's weight, say): push_sparse() and pull_sparse() move
/// only named rows of it, and shard boundaries fall between its rows.
struct table_range {
  std::size_t offset = 0;
  std::size_t rows = 0;
  std::size_t width = 0;
  std::size_t end() const noexcept { return offset + rows * width; }
};

/// One table's part of a sparse push: row indices in [0, rows) and one
/// gradient row for each (indices.size() x width values, row after row). A
/// repeated index adds, in order (as a dense scatter-add would).
struct table_rows {
  std::span<const std::int64_t> indices;
  std::span<const float> values;
};

struct options {
  consistency mode = consistency::sync;
  placement where = placement::dedicated;
  /// dedicated: the number of server ranks (1 <= servers < size). colocated:
  /// ignored, every rank serves.
  int servers = 1;
  /// ssp: how many pushes a worker may be ahead of the slowest live worker.
  int staleness = 1;
  /// local_sgd: local steps between parameter averages (H >= 1).
  int local_steps = 4;
  optimizer_options optimizer{};
  /// A server drops a worker it has heard nothing from for this long while
  /// it owed nothing (no pull waiting): a dead or stuck worker.
  std::chrono::milliseconds worker_timeout{60000};
  /// A worker whose push or pull a server has not completed within this
  /// long fails with server_error naming the server.
  std::chrono::milliseconds server_timeout{120000};
  /// The three user tags tag_base, +1, +2 carry the traffic.
  int tag_base = 12000;
  /// async/ssp: apply and serve in exactly this recorded order (a replay);
  /// null: live.
  const replay_record* replay = nullptr;
  /// A Chrome trace of this node's pushes, pulls, applies and serves, one
  /// file per rank (`trace.json` -> `trace.rank<r>.json`), written by
  /// write_timeline() or the destructor. Empty: `$RINGFLOW_TIMELINE` when
  /// set, else no trace (nothing recorded, nothing written). docs/ps.md
  /// lists the spans.
  std::filesystem::path timeline_path{};
  /// Sparse tables in the buffer, ascending and disjoint (docs/ps.md,
  /// "Sparse rows"). Their rows are updated lazily on the servers, as ad's
  /// optimizers update an ad::embedding's: only rows a gradient names move.
  std::vector<table_range> tables{};
};

/// A server rank stopped answering (ended, failed or timed out): the job
/// cannot continue without its shard.
class server_error : public comm_error {
 public:
  server_error(const std::string& what, int server_rank)
      : comm_error(what), server_rank_(server_rank) {}
  int server_rank() const noexcept { return server_rank_; }

 private:
  int server_rank_;
};

/// [begin, end) of the flat buffer.
struct shard_range {
  std::size_t begin = 0, end = 0;
  std::size_t size() const noexcept { return end - begin; }
};

/// Who does what, from (numel, size, options) alone: the same on every rank.
class layout {
 public:
  /// Throws usage_error (naming `rank`) when the servers do not fit the ranks
  /// or the buffer is smaller than the server count.
  layout(std::size_t numel, int size, const options& o, int rank = 0);
  std::size_t numel() const noexcept { return numel_; }
  int servers() const noexcept { return servers_; }
  int workers() const noexcept { return workers_; }
  int server_rank(int s) const noexcept { return s; }
  int worker_rank(int w) const noexcept { return colocated_ ? w : servers_ + w; }
  /// -1 when `rank` does not serve / work.
  int server_index(int rank) const noexcept { return rank < servers_ ? rank : -1; }
  int worker_index(int rank) const noexcept;
  /// Server s's shard: balanced contiguous ranges, each cut moved back to a
  /// row start where it would split a row of options::tables.
  shard_range shard(int s) const noexcept;
  /// The server whose shard holds flat element `i` (< numel()).
  int server_of(std::size_t i) const noexcept;

 private:
  std::size_t numel_;
  std::vector<std::size_t> bounds_;  // shard s is [bounds_[s], bounds_[s + 1])
  int size_, servers_, workers_;
  bool colocated_;
};

/// One server's account of a run.
struct server_stats {
  int server = -1;
  std::uint64_t updates = 0;         ///< optimizer steps applied to the shard
  std::uint64_t pushes = 0;          ///< gradient slices received
  std::uint64_t pulls = 0;           ///< pulls answered (parameter slices sent)
  std::uint64_t bytes_received = 0;  ///< headers and gradient slices, from all workers
  std::uint64_t bytes_sent = 0;      ///< parameter slices, to all workers
  std::vector<std::uint64_t> pushes_by_worker;
  /// [k]: pushes applied k shard updates after the pull their gradient was
  /// computed from; the last bucket counts k >= its index.
  std::vector<std::uint64_t> staleness;
  /// ssp: the largest (pushes of a served worker - pushes of the slowest live
  /// worker) when its pull was answered.
  std::int64_t max_clock_gap = 0;
  std::vector<int> finished;  ///< worker ranks that said goodbye (finish())
  std::vector<int> dropped;   ///< worker ranks dropped (died, went silent)
  std::vector<std::string> drop_reasons;
  std::vector<replay_event> record;
};

inline constexpr std::size_t staleness_buckets = 16;

/// A pending push or pull. Its buffer must stay valid until wait() returns.
class pending {
 public:
  pending() = default;
  pending(pending&&) noexcept = default;
  pending& operator=(pending&&) noexcept = default;
  ~pending();
  /// Blocks until done; server_error naming the server on failure/timeout.
  void wait();
  bool done() const noexcept { return requests_.empty(); }

 private:
  friend class node;
  std::string what_;
  int rank_ = -1;
  std::chrono::milliseconds timeout_{0};
  // The trace (null: off): one span per server, from the call to the moment
  // wait() saw that server's last request complete.
  std::shared_ptr<detail::trace_recorder> trace_;
  double start_us_ = 0;
  std::int64_t step_ = 0;
  std::vector<std::uint64_t> bytes_by_server_;
  std::vector<int> open_by_server_;    // requests not yet complete, per server
  std::vector<std::int64_t> headers_;  // wire headers: declared before requests_,
  std::vector<int> peers_;             // so they outlive the requests' destructors
  // Sparse pushes and pulls: packed slices and row offsets the requests read
  // or fill (the vectors' buffers stay put when pending moves), and what
  // wait() does once everything arrived (scatter a sparse pull's reply).
  std::vector<std::vector<float>> floats_;
  std::vector<std::vector<std::int64_t>> offsets_;
  std::vector<std::function<void()>> on_done_;
  std::vector<request> requests_;
};

/// One rank's part in a parameter-server job. Collective constructor: every
/// rank of `comm` builds one with the same size and options.
/// @code
///   ps::node n(comm, initial, {.mode = ps::consistency::ssp, .servers = 1, .staleness = 2});
///   if (n.is_server() && !n.is_worker()) { n.serve(); }
///   else {
///     n.pull(params).wait();
///     for (...) { compute grads; n.push(grads).wait(); n.pull(params).wait(); }
///     n.finish();
///   }
///   n.gather_parameters(params);   // every rank: the servers' final shards
/// @endcode
class node {
 public:
  node(communicator comm, std::span<const float> initial, options o);
  ~node();
  node(const node&) = delete;
  node& operator=(const node&) = delete;

  const layout& roles() const noexcept { return layout_; }
  const options& config() const noexcept { return opts_; }
  bool is_server() const noexcept { return server_index_ >= 0; }
  bool is_worker() const noexcept { return worker_index_ >= 0; }
  int server_index() const noexcept { return server_index_; }
  int worker_index() const noexcept { return worker_index_; }
  /// The workers' own communicator (local SGD averages over it).
  const communicator& workers() const noexcept { return workers_; }

  /// Dedicated server ranks: serves until every worker finished or was
  /// dropped, then returns this server's stats. (Colocated ranks serve on a
  /// thread started by the constructor; their stats come from stats().)
  const server_stats& serve();
  /// This rank's server stats (after serve() or finish()).
  const server_stats& stats() const noexcept { return stats_; }

  /// Workers: asks every server for its shard, into params[shard]. sync: the
  /// state after this worker's last push; ssp: held until within staleness.
  pending pull(std::span<float> params);
  /// Workers: sends every server its slice of `grads`.
  pending push(std::span<const float> grads);
  /// Workers, with options::tables: sends every server its slice of `grads`
  /// outside the tables (their ranges in `grads` are not read) and, of
  /// table t, only the rows rows[t] names. Servers apply the optimizer to
  /// the dense part and to those rows only. usage_error (naming the rank)
  /// for a row index outside the table or a wrong count of values or tables.
  pending push_sparse(std::span<const float> grads, std::span<const table_rows> rows);
  /// Workers, with options::tables: pulls the parameters outside the tables
  /// and, of table t, only the rows rows[t] names into `params` (the other
  /// rows of `params` are left as they are); held like pull().
  pending pull_sparse(std::span<float> params, std::span<const std::span<const std::int64_t>> rows);
  /// Workers, local_sgd: after local step `step` (0-based), averages `params`
  /// over the workers when (step + 1) % local_steps == 0; returns whether it did.
  bool average(std::span<float> params, std::int64_t step);
  /// Workers: tells every server this worker is done (colocated: then waits
  /// for this rank's server to end and rethrows its failure).
  void finish();

  /// Collective over all ranks, after serve()/finish(): `out` (numel floats)
  /// becomes the servers' final parameters. local_sgd: the workers' average
  /// of what they pass in `out`.
  void gather_parameters(std::span<float> out);

  /// Writes this rank's trace (options::timeline_path) now, replacing an
  /// earlier one; the destructor writes it again when spans were added
  /// since. A no-op when the trace is off. Throws ringflow::error naming the
  /// file when it cannot be written.
  void write_timeline();
  /// The file write_timeline() writes; empty when the trace is off.
  std::filesystem::path timeline_file() const;

  /// Workers: bytes this worker sent to servers (headers included).
  std::uint64_t bytes_sent() const noexcept { return bytes_sent_; }
  std::int64_t pushes() const noexcept { return clock_; }

 private:
  void check_worker(const char* what, std::size_t n) const;
  void trace_pending(pending& p, double start_us, std::int64_t step,
                     const std::vector<std::uint64_t>* bytes = nullptr) const;
  void check_rows(const char* what, std::size_t tables) const;
  void serve_loop();

  communicator comm_;
  communicator workers_;
  options opts_;
  layout layout_;
  int server_index_ = -1, worker_index_ = -1;
  std::vector<float> initial_shard_;
  std::vector<float> final_shard_;
  server_stats stats_;
  std::int64_t clock_ = 0;  // pushes sent by this worker
  std::uint64_t bytes_sent_ = 0;
  bool finished_ = false, served_ = false;
  // Header receives of silent workers, with the buffers they may still fill
  // (request second: destroyed, i.e. waited for, before its buffer).
  std::vector<std::pair<std::vector<std::int64_t>, request>> abandoned_;
  std::thread server_thread_;
  std::exception_ptr server_failure_;
  std::shared_ptr<detail::trace_recorder> trace_;  // null: no trace
};

}  // namespace ringflow::ps
