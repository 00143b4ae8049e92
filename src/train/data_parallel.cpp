// data_parallel: bucket planning, grad-ready hooks launching bucket allreduces in order, finish().
#include "ringflow/train/data_parallel.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <utility>

#include "bucket_step.hpp"
#include "ringflow/coll/async.hpp"
#include "ringflow/coll/collectives.hpp"
#include "ringflow/coll/extension.hpp"
#include "ringflow/coll/sparse.hpp"
#include "ringflow/core/log.hpp"

namespace ringflow::train {

comm_hook_fn allreduce_hook(coll_options coll) {
  return [coll](const bucket_view& v) {
    if (v.contributors == v.comm.size()) {
      allreduce(v.comm, v.grads, avg, coll);  // everyone contributed: the plain average
      return;
    }
    // Joined ranks sent zeros: sum, then divide by the contributors only (as
    // avg does with the rank count: one rounding).
    allreduce(v.comm, v.grads, sum, coll);
    if (v.contributors > 0) {
      const auto n = static_cast<float>(v.contributors);
      for (float& g : v.grads) g /= n;
    }
  };
}

std::vector<bucket> plan_buckets(const ad::parameter_store<float>& params, std::size_t cap_bytes,
                                 std::size_t first_cap_bytes) {
  std::vector<bucket> out;
  bucket current;
  std::size_t current_cap = first_cap_bytes;
  for (std::size_t k = params.size(); k-- > 0;) {
    const auto& p = params[k];
    const std::size_t bytes = p.size * sizeof(float);
    if (!current.params.empty() && current.bytes() + bytes > current_cap) {
      out.push_back(std::move(current));
      current = bucket{};
      current_cap = cap_bytes;
    }
    // Reverse order: each parameter extends the bucket downwards.
    current.offset = p.offset;
    current.size += p.size;
    current.params.push_back(k);
  }
  if (!current.params.empty()) out.push_back(std::move(current));
  return out;
}

std::uint64_t ring_bytes_sent(std::size_t count, std::size_t elem_bytes, int ranks, int rank,
                              bool reduce, bool gather) {
  if (ranks <= 1 || count == 0) return 0;
  std::uint64_t elems = 0;
  if (reduce) elems += count - partition(count, ranks, rank).count;
  if (gather) elems += count - partition(count, ranks, (rank + 1) % ranks).count;
  return elems * elem_bytes;
}

namespace {
// The parameter tensors of a bucket (offsets relative to it), so that
// PowerSGD compresses each 2-D parameter as its own matrix.
compress::bucket_layout layout_of(const bucket& bk, const ad::parameter_store<float>& params) {
  compress::bucket_layout l{bk.size, {}};
  for (const std::size_t i : bk.params) {
    const auto& p = params[i];
    if (p.size == 0) continue;
    const auto rows = static_cast<std::size_t>(p.tensor.rows());
    const auto cols = static_cast<std::size_t>(p.tensor.cols());
    l.tensors.push_back(rows * cols == p.size
                            ? compress::tensor_shape{p.offset - bk.offset, rows, cols}
                            : compress::tensor_shape{p.offset - bk.offset, 1, p.size});
  }
  return l;
}

// The plan without the sparse parameters (ad::embedding tables, reduced by
// sparse_allreduce instead): a bucket holding one is cut around it, so every
// bucket is still a contiguous slice of the gradient buffer.
std::vector<bucket> without_sparse(std::vector<bucket> plan, const std::vector<bool>& sparse,
                                   const ad::parameter_store<float>& params) {
  if (std::find(sparse.begin(), sparse.end(), true) == sparse.end()) return plan;
  std::vector<bucket> out;
  for (auto& bk : plan) {
    bucket piece;
    for (const std::size_t k : bk.params) {  // descending offsets
      if (sparse[k]) {
        if (!piece.params.empty()) out.push_back(std::move(piece));
        piece = bucket{};
        continue;
      }
      piece.offset = params[k].offset;
      piece.size += params[k].size;
      piece.params.push_back(k);
    }
    if (!piece.params.empty()) out.push_back(std::move(piece));
  }
  return out;
}
}  // namespace

struct data_parallel::state {
  communicator comm;
  ad::parameter_store<float> params;
  data_parallel_options opts;
  train::timeline tl;
  std::vector<bucket> buckets;
  // Parameters with sparse row gradients (ad::embedding): no bucket; each is
  // reduced by one sparse_allreduce after the buckets, in parameter order.
  std::vector<bool> is_sparse;
  std::vector<std::size_t> sparse_params;
  std::vector<collective_handle> sparse_handles;
  std::vector<detail::span_record> sparse_records;
  std::vector<std::uint64_t> sparse_bytes;  // per sparse parameter, written where it runs
  std::unique_ptr<compress::bucket_compression> compression;  // null: plain allreduce
  comm_hook_fn hook;  // how a bucket is reduced: the user's, the compression, or allreduce_hook
  detail::step_tracker t{"train::data_parallel"};  // who fired, what may launch, join's count
  compress::traffic traffic_before;                // compressed bytes at the start of the step
  std::vector<collective_handle> handles;
  std::vector<detail::span_record> records;
  step_stats current;
  step_stats last;
  std::vector<std::uint32_t> last_fired;

  void reset_step() {
    t.reset();
    if (compression) traffic_before = compression->total();
    std::fill(records.begin(), records.end(), detail::span_record{});
    std::fill(sparse_records.begin(), sparse_records.end(), detail::span_record{});
    std::fill(sparse_bytes.begin(), sparse_bytes.end(), std::uint64_t{0});
    current = {};
  }

  void on_ready(std::size_t i) {
    if (i >= t.fired.size() || !t.count_ready(i, params)) return;
    if (is_sparse[i]) return;  // reduced in finish(), after the buckets
    if (t.bucket_done(i)) launch_ready();
  }

  // Queues the sparse_allreduce of sparse parameter `k` (its index in
  // sparse_params): the rows of every rank, summed per index, divided by the
  // contributors (as allreduce(avg) divides: one rounding), replace this
  // rank's rows in the parameter's sparse gradient.
  void launch_sparse(std::size_t k) {
    const std::size_t i = sparse_params[k];
    ad::sparse_rows_grad<float>* g = params[i].tensor.sparse_grad();
    std::uint64_t* bytes = &sparse_bytes[k];
    const std::int32_t* count = opts.uneven_inputs ? &t.contributors : nullptr;
    const std::string name = params[i].name;
    sparse_handles[k] = detail::enqueue_timed(
        comm, &sparse_records[k], tl, t.step,
        [g, bytes, count](const communicator& c) {
          g->coalesce();
          // The table's row count lets sparse_allreduce reduce densely when
          // the ranks' rows together would send more than the table.
          auto r = sparse_allreduce<float>(c, std::span<const std::int64_t>(g->indices),
                                           std::span<const float>(g->values), g->width,
                                           {.table_rows = static_cast<std::size_t>(g->rows)});
          const int n = count != nullptr ? *count : c.size();
          if (n > 0) {
            const avg_op average;
            for (float& v : r.values) v = average.finish(v, n);
          }
          *bytes = sparse_allreduce_bytes_sent(r, c.rank());
          g->indices = std::move(r.indices);
          g->values = std::move(r.values);
          g->coalesced = true;
        },
        [bytes, name](trace_event& e) {
          e.name = fmt::format("sparse allreduce {}", name);
          e.bytes = static_cast<std::int64_t>(*bytes);
        });
  }

  // Launches buckets strictly in order, so every rank queues the same sequence.
  void launch_ready() {
    while (t.next < buckets.size() && t.pending[t.next] == 0) {
      launch(t.next++);
      ++current.buckets_launched_in_backward;
    }
  }

  void launch(std::size_t b) {
    if (opts.uneven_inputs && !t.flag_launched) t.launch_flag(comm);
    const bucket& bk = buckets[b];
    const std::span<float> data = params.all_grads().subspan(bk.offset, bk.size);
    const std::int64_t at_step = t.step;
    const comm_hook_fn* reduce = &hook;  // lives in the state, which outlives the handles
    const bool compressed = compression != nullptr;
    const std::int32_t* count = opts.uneven_inputs ? &t.contributors : nullptr;
    // Enqueued by hand (rather than allreduce_async) to timestamp the
    // allreduce where it runs: on the progress thread.
    handles[b] = detail::enqueue_timed(
        comm, &records[b], tl, at_step,
        [data, at_step, b, reduce, count](const communicator& c) {
          (*reduce)(bucket_view{c, data, b, at_step, count != nullptr ? *count : c.size()});
        },
        [data, b, compressed](trace_event& e) {
          e.name = compressed ? fmt::format("compressed allreduce bucket {}", b)
                              : fmt::format("allreduce bucket {}", b);
          e.bucket = static_cast<std::int64_t>(b);
          e.bytes = static_cast<std::int64_t>(data.size_bytes());
        });
  }

  void wait_quietly() noexcept {
    t.wait_quietly(
        {std::span<collective_handle>(handles), std::span<collective_handle>(sparse_handles)});
  }
};

data_parallel::data_parallel(communicator comm, ad::parameter_store<float> params,
                             data_parallel_options opts)
    : state_(std::make_unique<state>()) {
  auto& s = *state_;
  if (!comm.valid()) throw usage_error("train::data_parallel: the communicator is not valid");
  if (opts.root < 0 || opts.root >= comm.size()) {
    throw usage_error(fmt::format("train::data_parallel on rank {}: root {} is outside [0, {})",
                                  comm.rank(), opts.root, comm.size()));
  }
  params.check_bound();
  if (opts.compress.empty()) opts.compress = "none";
  if (opts.uneven_inputs && opts.compress != "none") {
    throw not_supported_error(fmt::format(
        "train::data_parallel on rank {}: uneven_inputs (join) with compression '{}' is not "
        "supported (a joined rank's error-feedback residual would still be sent); use "
        "compress = \"none\" or even inputs",
        comm.rank(), opts.compress));
  }
  if (opts.comm_hook && opts.compress != "none") {
    throw usage_error(fmt::format(
        "train::data_parallel on rank {}: both a comm_hook and compression '{}' were given; a "
        "hook replaces the built-in reduction, so compress inside the hook or leave it empty",
        comm.rank(), opts.compress));
  }
  if (opts.compress != "none") {
    // Throws usage_error on a bad spec, on every rank alike, before any collective.
    // A bucket left uncompressed (auto's none) is averaged exactly like the
    // plain path below: allreduce(avg) with these coll options.
    compress::bucket_compression_options co = opts.compress_options;
    co.plain_coll = opts.coll;
    s.compression = std::make_unique<compress::bucket_compression>(opts.compress, std::move(co));
    // Only the progress thread touches it while buckets are in flight; it
    // runs them one at a time in bucket order, the same on every rank, which
    // is what bucket_compression needs (finish() waits before anyone reads it).
    compress::bucket_compression* bc = s.compression.get();
    s.hook = [bc](const bucket_view& v) { bc->reduce(v.comm, v.grads, v.index); };
  } else {
    s.hook = opts.comm_hook ? opts.comm_hook : allreduce_hook(opts.coll);
  }
  s.comm = std::move(comm);
  s.params = std::move(params);
  s.opts = std::move(opts);
  s.tl = s.opts.timeline_path.empty() ? train::timeline::from_env(s.comm.rank())
                                      : train::timeline(s.comm.rank(), s.opts.timeline_path);
  s.is_sparse.assign(s.params.size(), false);
  for (std::size_t i = 0; i < s.params.size(); ++i) {
    if (auto* g = s.params[i].tensor.sparse_grad();
        g != nullptr && s.params[i].tensor.requires_grad()) {
      s.is_sparse[i] = true;
      s.sparse_params.push_back(i);
      g->rank = s.comm.rank();  // for the embedding's error messages
    }
  }
  s.buckets =
      without_sparse(plan_buckets(s.params, s.opts.bucket_cap_bytes, s.opts.first_bucket_cap_bytes),
                     s.is_sparse, s.params);
  s.t.plan(s.buckets, s.params, s.comm.rank());
  if (s.compression) {
    for (std::size_t b = 0; b < s.buckets.size(); ++b) {
      s.compression->set_layout(b, layout_of(s.buckets[b], s.params));
    }
  }
  for (const std::size_t i : s.sparse_params) s.t.expected[i] = true;
  s.sparse_handles.resize(s.sparse_params.size());
  s.sparse_records.resize(s.sparse_params.size());
  s.sparse_bytes.resize(s.sparse_params.size());
  s.last_fired = s.t.fired;
  s.handles.resize(s.buckets.size());
  s.records.resize(s.buckets.size());
  s.reset_step();

  // Same model everywhere? Which parameters are sparse must agree too (their
  // reduction differs).
  std::uint64_t h = detail::layout_hash(s.params);
  for (const std::size_t i : s.sparse_params) h = (h ^ (i + 1)) * 0x100000001b3ull;
  detail::check_same_model(s.comm, s.params, h, "train::data_parallel");
  if (s.opts.broadcast_parameters) {
    broadcast_async(s.comm, s.params.all_values(), s.opts.root).wait();
  }
  state* raw = state_.get();
  s.params.set_grad_ready_hook([raw](std::size_t i, const ad::tensor&) { raw->on_ready(i); });
}

data_parallel::~data_parallel() {
  if (!state_) return;
  state_->params.set_grad_ready_hook(nullptr);
  state_->wait_quietly();
  try {
    state_->tl.write();
  } catch (const std::exception& e) {
    log::error("{}", e.what());
  }
}

data_parallel::data_parallel(data_parallel&&) noexcept = default;

data_parallel& data_parallel::operator=(data_parallel&& other) noexcept {
  if (this != &other) {
    if (state_) {
      state_->params.set_grad_ready_hook(nullptr);
      state_->wait_quietly();
    }
    state_ = std::move(other.state_);
  }
  return *this;
}

train::timeline::scoped_span data_parallel::span(std::string_view name) const {
  return state_->tl.scope(name, state_->t.step);
}

void data_parallel::backward(const ad::tensor& loss) {
  auto& s = *state_;
  if (s.t.no_sync) ++s.t.accumulated_backwards;
  const double t0 = now_us();
  ad::backward(loss);
  const double t1 = now_us();
  s.tl.record("backward", lane::compute, t0, t1, s.t.step);
  s.current.backward_s += (t1 - t0) * 1e-6;
}

no_sync_scope data_parallel::no_sync() {
  auto& s = *state_;
  if (s.t.no_sync) {
    throw usage_error(
        fmt::format("train::data_parallel on rank {}: no_sync() while a no_sync scope is alive",
                    s.comm.rank()));
  }
  return no_sync_scope(&s.t.no_sync);
}

memory_stats data_parallel::memory(std::size_t optimizer_state_bytes) const {
  const auto& s = *state_;
  return {s.params.numel() * sizeof(float), s.params.all_grads().size_bytes(),
          optimizer_state_bytes};
}

void data_parallel::finish() {
  auto& s = *state_;
  if (s.t.no_sync) {
    throw usage_error(fmt::format(
        "train::data_parallel on rank {}: finish() (or step()) inside a no_sync() scope; end "
        "the scope and run the last backward of the accumulation outside it",
        s.comm.rank()));
  }
  if (s.opts.uneven_inputs && !s.t.flag_launched) s.t.launch_flag(s.comm);
  // Buckets whose hooks did not all fire: a parameter that got no gradient
  // contributes zero (from this rank). Launched in bucket order, like the rest.
  for (std::size_t b = s.t.next; b < s.buckets.size(); ++b) {
    s.t.zero_missing(s.buckets[b], s.params, s.params.all_grads());
    s.launch(b);
  }
  s.t.next = s.buckets.size();
  for (std::size_t k = 0; k < s.sparse_params.size(); ++k) {
    const std::size_t i = s.sparse_params[k];
    // No gradient this step: this rank contributes no rows.
    if (s.t.fired[i] == 0 && !s.t.accumulated[i]) s.params[i].tensor.sparse_grad()->clear();
    s.launch_sparse(k);
  }
  const double w0 = now_us();
  const std::exception_ptr failure = s.t.wait_step(
      {std::span<collective_handle>(s.handles), std::span<collective_handle>(s.sparse_handles)});
  const double w1 = now_us();
  s.tl.record("wait", lane::compute, w0, w1, s.t.step);
  s.current.wait_s = (w1 - w0) * 1e-6;
  s.current.contributing_ranks = s.t.contributing(s.comm, s.opts.uneven_inputs);
  s.current.comm_s = detail::busy_seconds(s.records) + detail::busy_seconds(s.sparse_records);
  s.current.accumulated_backwards = s.t.accumulated_backwards;
  if (s.compression) {
    s.current.bytes_sent = s.compression->total().bytes_sent - s.traffic_before.bytes_sent;
  } else {
    for (const auto& bk : s.buckets) {
      s.current.bytes_sent +=
          ring_bytes_sent(bk.size, sizeof(float), s.comm.size(), s.comm.rank(), true, true);
    }
  }
  for (const std::uint64_t b : s.sparse_bytes) s.current.bytes_sent += b;
  if (s.opts.uneven_inputs) {
    s.current.bytes_sent +=
        ring_bytes_sent(1, sizeof(std::int32_t), s.comm.size(), s.comm.rank(), true, true);
  }
  s.last = s.current;
  s.last_fired = s.t.fired;
  ++s.t.step;
  s.reset_step();
  if (failure) std::rethrow_exception(failure);
}

bool data_parallel::shadow_step() {
  auto& s = *state_;
  if (!s.t.join_round(s.comm, s.opts.uneven_inputs, "data_parallel_options")) return false;
  // A zero contribution, frozen parameters' slots included.
  auto grads = s.params.all_grads();
  std::fill(grads.begin(), grads.end(), 0.0f);
  for (const std::size_t i : s.sparse_params) s.params[i].tensor.sparse_grad()->clear();
  finish();
  return true;
}

const std::vector<bucket>& data_parallel::buckets() const { return state_->buckets; }
std::int64_t data_parallel::steps() const { return state_->t.step; }
const step_stats& data_parallel::last_step() const { return state_->last; }
const std::vector<std::uint32_t>& data_parallel::ready_counts() const { return state_->last_fired; }
const std::string& data_parallel::compression() const { return state_->opts.compress; }
compress::traffic data_parallel::compression_traffic() const {
  return state_->compression ? state_->compression->total() : compress::traffic{};
}
std::string data_parallel::compression_of(std::size_t b) const {
  return state_->compression ? state_->compression->spec_of(b) : std::string("none");
}
compress::bucket_compression* data_parallel::bucket_compression() const {
  return state_->compression.get();
}
const communicator& data_parallel::comm() const { return state_->comm; }
const ad::parameter_store<float>& data_parallel::parameters() const { return state_->params; }
const train::timeline& data_parallel::trace() const { return state_->tl; }
void data_parallel::write_timeline() const { state_->tl.write(); }

}  // namespace ringflow::train
