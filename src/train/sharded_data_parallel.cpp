// sharded_data_parallel: ZeRO stages 1 and 2 over data_parallel's buckets (reduce-scatter during
// backward, the optimizer on this rank's pieces, allgather of the parameters).
#include "ringflow/train/sharded_data_parallel.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <utility>

#include "bucket_step.hpp"
#include "ringflow/coll/async.hpp"
#include "ringflow/coll/collectives.hpp"
#include "ringflow/coll/extension.hpp"
#include "ringflow/core/log.hpp"

namespace ringflow::train {

struct sharded_data_parallel::state {
  communicator comm;
  ad::parameter_store<float> params;
  sharded_data_parallel_options opts;
  train::timeline tl;
  std::vector<bucket> buckets;
  std::vector<chunk> owned;               // per bucket, in the model's flat buffers
  std::vector<std::size_t> shard_offset;  // per bucket, in shard's buffers
  std::size_t shard_numel = 0;
  ad::parameter_store<float> shard;
  // Stage 2: each bucket's gradients live in a buffer of their own, made
  // when a backward first reaches one of its parameters and freed once the
  // bucket is reduced. It sits at the address the bucket had in the model's
  // flat buffer modulo 64 bytes, so vectorized kernels writing gradients take
  // the same (alignment-dependent) paths and round alike: that keeps stage 2
  // bitwise equal to data_parallel.
  std::vector<std::shared_ptr<float>> bucket_grads;
  std::size_t flat_grads_mod64 = 0;
  std::atomic<std::size_t> bucket_grad_bytes{0};  // freed on the progress thread
  std::size_t peak_grad_bytes = 0;
  // Per step.
  detail::step_tracker t{"train::sharded_data_parallel"};  // as in data_parallel
  std::vector<collective_handle> handles;
  std::vector<detail::span_record> records;
  step_stats current;
  step_stats last;
  std::vector<std::uint32_t> last_fired;
  // finish() ran and shard()'s averaged gradients await step() (which then
  // must not reduce again: the model's gradients are consumed).
  bool reduced = false;

  int rank() const { return comm.rank(); }

  std::span<float> shard_grads(std::size_t b) const {
    return shard.all_grads().subspan(shard_offset[b], owned[b].count);
  }
  std::span<float> shard_values(std::size_t b) const {
    return shard.all_values().subspan(shard_offset[b], owned[b].count);
  }

  std::size_t gradient_bytes_now() const {
    const std::size_t model =
        opts.stage >= 2 ? bucket_grad_bytes.load() : params.all_grads().size_bytes();
    return model + shard_numel * sizeof(float);
  }
  void note_peak() { peak_grad_bytes = std::max(peak_grad_bytes, gradient_bytes_now()); }

  void reset_step() {
    t.reset();
    std::fill(records.begin(), records.end(), detail::span_record{});
    current = {};
  }

  void on_ready(std::size_t i) {
    if (i >= t.fired.size() || !t.count_ready(i, params)) return;
    if (t.bucket_done(i)) {
      while (t.next < buckets.size() && t.pending[t.next] == 0) {
        launch(t.next++);
        ++current.buckets_launched_in_backward;
      }
    }
  }

  // Stage 2: the gradient buffer of bucket b (zeros), made on first use.
  std::shared_ptr<float> bucket_buffer(std::size_t b) {
    if (bucket_grads[b]) return bucket_grads[b];
    const bucket& bk = buckets[b];
    constexpr std::size_t pad = 64 / sizeof(float);
    std::shared_ptr<float[]> mem(new float[bk.size + pad]());
    const auto addr = reinterpret_cast<std::uintptr_t>(mem.get());
    const std::size_t target = (flat_grads_mod64 + bk.offset * sizeof(float)) % 64;
    const std::size_t shift = ((target + 64 - addr % 64) % 64) / sizeof(float);
    bucket_grads[b] = std::shared_ptr<float>(mem, mem.get() + shift);
    bucket_grad_bytes += (bk.size + pad) * sizeof(float);
    note_peak();
    return bucket_grads[b];
  }

  // Where the backward puts parameter i's gradient at stage 2.
  std::shared_ptr<float> grad_of(std::size_t i) {
    const std::size_t b = t.bucket_of[i];
    std::shared_ptr<float> buf = bucket_buffer(b);
    return std::shared_ptr<float>(buf, buf.get() + (params[i].offset - buckets[b].offset));
  }

  // Stage 2: hands bucket b's buffer over to its reduce-scatter; the
  // parameters' gradients (views of it) are dropped.
  std::shared_ptr<float> take_bucket(std::size_t b) {
    const bucket& bk = buckets[b];
    std::shared_ptr<float> buf = bucket_buffer(b);
    // As in data_parallel: a parameter with no gradient this step contributes zero.
    t.zero_missing(bk, params, std::span<float>(buf.get(), bk.size), bk.offset);
    for (const std::size_t i : bk.params) params[i].tensor.node()->grad.reset();
    bucket_grads[b].reset();
    return buf;
  }

  void launch(std::size_t b) {
    if (opts.uneven_inputs && !t.flag_launched) t.launch_flag(comm);
    const bucket& bk = buckets[b];
    std::span<const float> in;
    std::shared_ptr<float> staging;
    std::size_t staged_bytes = 0;
    if (opts.stage >= 2) {
      staging = take_bucket(b);
      in = std::span<const float>(staging.get(), bk.size);
      staged_bytes = (bk.size + 64 / sizeof(float)) * sizeof(float);
    } else {
      in = params.all_grads().subspan(bk.offset, bk.size);
    }
    const std::span<float> out = shard_grads(b);
    const coll_options coll = opts.coll;
    std::atomic<std::size_t>* live = &bucket_grad_bytes;
    const std::int32_t* count = opts.uneven_inputs ? &t.contributors : nullptr;
    current.bytes_sent += ring_bytes_sent(bk.size, sizeof(float), comm.size(), rank(), true, false);
    handles[b] = detail::enqueue_timed(
        comm, &records[b], tl, t.step,
        [in, out, coll, staging, staged_bytes, live, count](const communicator& c) mutable {
          if (count == nullptr || *count == c.size()) {
            reduce_scatter<float>(c, in, out, avg, coll);
          } else {
            // Joined ranks sent zeros: the sum over the contributors only.
            reduce_scatter<float>(c, in, out, sum, coll);
            if (*count > 0) {
              const auto n = static_cast<float>(*count);
              for (float& g : out) g /= n;
            }
          }
          if (staging) {
            staging.reset();
            *live -= staged_bytes;
          }
        },
        [in, b](trace_event& e) {
          e.name = fmt::format("reduce_scatter bucket {}", b);
          e.bucket = static_cast<std::int64_t>(b);
          e.bytes = static_cast<std::int64_t>(in.size_bytes());
        });
  }

  void wait_quietly() noexcept { t.wait_quietly({std::span<collective_handle>(handles)}); }
};

sharded_data_parallel::sharded_data_parallel(communicator comm, ad::parameter_store<float> params,
                                             sharded_data_parallel_options opts)
    : state_(std::make_unique<state>()) {
  auto& s = *state_;
  if (!comm.valid()) {
    throw usage_error("train::sharded_data_parallel: the communicator is not valid");
  }
  const int rank = comm.rank();
  if (opts.stage == 3) {
    throw not_supported_error(
        fmt::format("train::sharded_data_parallel on rank {}: stage 3 (sharded parameters) is not "
                    "implemented yet; use stage 1 or 2",
                    rank));
  }
  if (opts.stage == 0) {
    throw usage_error(fmt::format(
        "train::sharded_data_parallel on rank {}: stage 0 is plain data parallelism; use "
        "train::data_parallel (or stage 1 or 2 here)",
        rank));
  }
  if (opts.stage != 1 && opts.stage != 2) {
    throw usage_error(fmt::format(
        "train::sharded_data_parallel on rank {}: stage {} does not exist; use 1 (optimizer "
        "state sharded) or 2 (gradients too)",
        rank, opts.stage));
  }
  if (opts.root < 0 || opts.root >= comm.size()) {
    throw usage_error(
        fmt::format("train::sharded_data_parallel on rank {}: root {} is outside [0, {})", rank,
                    opts.root, comm.size()));
  }
  if (opts.coll.algorithm != algo::automatic && opts.coll.algorithm != algo::ring) {
    throw usage_error(fmt::format(
        "train::sharded_data_parallel on rank {}: algo::{} cannot run the sharded "
        "reduce-scatter and allgather; use algo::ring or algo::automatic (both the ring)",
        rank, algo_name(opts.coll.algorithm)));
  }
  params.check_bound();
  for (const auto& p : params) {
    if (p.tensor.sparse_grad() != nullptr) {
      throw not_supported_error(fmt::format(
          "train::sharded_data_parallel on rank {}: parameter '{}' has sparse row gradients "
          "(ad::embedding); the sharded trainer reduces dense gradients only: build the "
          "embedding with embedding_options::sparse = false, or use train::data_parallel",
          rank, p.name));
    }
  }
  if (params.numel() == 0) {
    throw usage_error(fmt::format(
        "train::sharded_data_parallel on rank {}: the parameter store is empty; build the "
        "model before the trainer",
        rank));
  }
  if (params.grads_released()) {
    throw usage_error(fmt::format(
        "train::sharded_data_parallel on rank {}: the parameter store's gradients are already "
        "released (another stage-2 trainer over it is alive?); one trainer per store",
        rank));
  }
  opts.coll.algorithm = algo::ring;
  s.comm = std::move(comm);
  s.params = std::move(params);
  s.opts = std::move(opts);
  s.tl = s.opts.timeline_path.empty() ? train::timeline::from_env(rank)
                                      : train::timeline(rank, s.opts.timeline_path);
  s.buckets = plan_buckets(s.params, s.opts.bucket_cap_bytes, s.opts.first_bucket_cap_bytes);
  s.t.plan(s.buckets, s.params, rank);
  const int p = s.comm.size();
  for (std::size_t b = 0; b < s.buckets.size(); ++b) {
    const bucket& bk = s.buckets[b];
    const chunk piece = partition(bk.size, p, rank);
    s.owned.push_back({bk.offset + piece.offset, piece.count});
    s.shard_offset.push_back(s.shard_numel);
    s.shard_numel += piece.count;
  }
  if (s.shard_numel > 0) {
    s.shard.add("shard", ad::shape{static_cast<ad::index>(s.shard_numel)});
  }
  s.bucket_grads.resize(s.buckets.size());
  s.last_fired = s.t.fired;
  s.handles.resize(s.buckets.size());
  s.records.resize(s.buckets.size());
  s.reset_step();

  detail::check_same_model(s.comm, s.params, detail::layout_hash(s.params),
                           "train::sharded_data_parallel");
  if (s.opts.broadcast_parameters) {
    broadcast_async(s.comm, s.params.all_values(), s.opts.root).wait();
  }
  if (s.opts.stage >= 2) {
    s.flat_grads_mod64 = reinterpret_cast<std::uintptr_t>(s.params.all_grads().data()) % 64;
    state* raw = state_.get();
    s.params.release_grads([raw](std::size_t i) { return raw->grad_of(i); });
  }
  s.note_peak();
  state* raw = state_.get();
  s.params.set_grad_ready_hook([raw](std::size_t i, const ad::tensor&) { raw->on_ready(i); });
}

sharded_data_parallel::~sharded_data_parallel() {
  if (!state_) return;
  state_->params.set_grad_ready_hook(nullptr);
  state_->wait_quietly();
  try {
    state_->params.pack_grads();
    state_->tl.write();
  } catch (const std::exception& e) {
    log::error("{}", e.what());
  }
}

ad::parameter_store<float> sharded_data_parallel::shard() const { return state_->shard; }
const std::vector<chunk>& sharded_data_parallel::owned() const { return state_->owned; }

train::timeline::scoped_span sharded_data_parallel::span(std::string_view name) const {
  return state_->tl.scope(name, state_->t.step);
}

void sharded_data_parallel::backward(const ad::tensor& loss) {
  auto& s = *state_;
  s.reduced = false;  // a new step's gradients
  if (s.t.no_sync) ++s.t.accumulated_backwards;
  const double t0 = now_us();
  ad::backward(loss);
  const double t1 = now_us();
  s.tl.record("backward", lane::compute, t0, t1, s.t.step);
  s.current.backward_s += (t1 - t0) * 1e-6;
}

no_sync_scope sharded_data_parallel::no_sync() {
  auto& s = *state_;
  if (s.t.no_sync) {
    throw usage_error(fmt::format(
        "train::sharded_data_parallel on rank {}: no_sync() while a no_sync scope is alive",
        s.rank()));
  }
  return no_sync_scope(&s.t.no_sync);
}

void sharded_data_parallel::finish() {
  auto& s = *state_;
  if (s.t.no_sync) {
    throw usage_error(fmt::format(
        "train::sharded_data_parallel on rank {}: finish() (or step()) inside a no_sync() "
        "scope; end the scope and run the last backward of the accumulation outside it",
        s.rank()));
  }
  if (s.opts.uneven_inputs) {
    if (!s.t.flag_launched) s.t.launch_flag(s.comm);
    // The step's one count of contributing ranks (launched here, by the first
    // bucket, or by join()).
    s.current.bytes_sent +=
        ring_bytes_sent(1, sizeof(std::int32_t), s.comm.size(), s.rank(), true, true);
  }
  for (std::size_t b = s.t.next; b < s.buckets.size(); ++b) {
    // As in data_parallel: a parameter with no gradient this step contributes
    // zero (at stage 2, take_bucket zeroes it in the bucket's own buffer).
    if (s.opts.stage < 2) s.t.zero_missing(s.buckets[b], s.params, s.params.all_grads());
    s.launch(b);
  }
  s.t.next = s.buckets.size();
  const double w0 = now_us();
  const std::exception_ptr failure = s.t.wait_step({std::span<collective_handle>(s.handles)});
  const double w1 = now_us();
  s.tl.record("wait", lane::compute, w0, w1, s.t.step);
  s.current.contributing_ranks = s.t.contributing(s.comm, s.opts.uneven_inputs);
  // The model's gradients are consumed: the next step accumulates from zero
  // (at stage 2 they were freed bucket by bucket already).
  if (s.opts.stage < 2) s.params.zero_grad();
  s.current.wait_s = (w1 - w0) * 1e-6;
  s.current.comm_s = detail::busy_seconds(s.records);
  s.current.accumulated_backwards = s.t.accumulated_backwards;
  s.last = s.current;
  s.last_fired = s.t.fired;
  ++s.t.step;
  s.reset_step();
  s.reduced = failure == nullptr;
  if (failure) std::rethrow_exception(failure);
}

bool sharded_data_parallel::reduced() const { return state_->reduced; }

bool sharded_data_parallel::shadow_finish() {
  auto& s = *state_;
  if (!s.t.join_round(s.comm, s.opts.uneven_inputs, "sharded_data_parallel_options")) {
    s.current = {};
    return false;
  }
  // A zero contribution: stage 1 zeroes the flat buffer; stage 2's bucket
  // buffers are made as zeros when finish() launches them.
  if (s.opts.stage < 2) s.params.zero_grad();
  finish();
  return true;
}

void sharded_data_parallel::check_optimizer(const ad::parameter_store<float>& optimized) const {
  const auto& s = *state_;
  if (!optimized.same_store(s.shard)) {
    throw usage_error(fmt::format(
        "train::sharded_data_parallel on rank {}: the optimizer is not built over shard() "
        "(it covers {} elements, this rank's shard {}); build it as ad::adamw opt(sdp.shard())",
        s.rank(), optimized.numel(), s.shard_numel));
  }
}

void sharded_data_parallel::before_update() {
  auto& s = *state_;
  // The model's parameters are authoritative (a checkpoint may have been
  // loaded into them): the shard starts each update from their values.
  const auto values = s.params.all_values();
  for (std::size_t b = 0; b < s.buckets.size(); ++b) {
    const chunk& o = s.owned[b];
    std::copy_n(values.begin() + static_cast<std::ptrdiff_t>(o.offset), o.count,
                s.shard_values(b).begin());
  }
}

void sharded_data_parallel::gather_parameters() {
  auto& s = *state_;
  const double t0 = now_us();
  const auto values = s.params.all_values();
  const coll_options coll = s.opts.coll;
  std::vector<collective_handle> gathers;
  gathers.reserve(s.buckets.size());
  std::uint64_t bytes = 0;
  for (std::size_t b = 0; b < s.buckets.size(); ++b) {
    const bucket& bk = s.buckets[b];
    const std::span<const float> in = s.shard_values(b);
    const std::span<float> out = values.subspan(bk.offset, bk.size);
    bytes += ring_bytes_sent(bk.size, sizeof(float), s.comm.size(), s.rank(), false, true);
    gathers.push_back(allgather_async(s.comm, in, out, coll));
  }
  wait_all(std::span<collective_handle>(gathers));
  const double t1 = now_us();
  s.tl.record("allgather", lane::compute, t0, t1, s.t.step - 1);
  // Counted in the step just finished (last_step()).
  s.last.bytes_sent += bytes;
  s.last.comm_s += (t1 - t0) * 1e-6;
  s.reduced = false;
}

double sharded_data_parallel::clip_grad_norm(double max_norm) {
  auto& s = *state_;
  if (!(max_norm > 0)) {
    throw usage_error(fmt::format(
        "train::sharded_data_parallel on rank {}: clip_grad_norm: max_norm {} must be positive",
        s.rank(), max_norm));
  }
  double sq = 0;
  for (const float g : s.shard.all_grads()) sq += static_cast<double>(g) * g;
  allreduce_async(s.comm, std::span<double>(&sq, 1), sum, coll_options{algo::ring, 0}).wait();
  s.last.bytes_sent += ring_bytes_sent(1, sizeof(double), s.comm.size(), s.rank(), true, true);
  const double norm = std::sqrt(sq);
  if (norm > max_norm) {
    const auto k = static_cast<float>(max_norm / norm);
    for (float& g : s.shard.all_grads()) g *= k;
  }
  return norm;
}

int sharded_data_parallel::stage() const { return state_->opts.stage; }
const std::vector<bucket>& sharded_data_parallel::buckets() const { return state_->buckets; }
std::int64_t sharded_data_parallel::steps() const { return state_->t.step; }
const step_stats& sharded_data_parallel::last_step() const { return state_->last; }
const std::vector<std::uint32_t>& sharded_data_parallel::ready_counts() const {
  return state_->last_fired;
}

memory_stats sharded_data_parallel::memory(std::size_t optimizer_state_bytes) const {
  const auto& s = *state_;
  return {(s.params.numel() + s.shard_numel) * sizeof(float), s.gradient_bytes_now(),
          optimizer_state_bytes};
}

std::size_t sharded_data_parallel::peak_gradient_bytes() const { return state_->peak_grad_bytes; }
const communicator& sharded_data_parallel::comm() const { return state_->comm; }
const ad::parameter_store<float>& sharded_data_parallel::parameters() const {
  return state_->params;
}
const train::timeline& sharded_data_parallel::trace() const { return state_->tl; }
void sharded_data_parallel::write_timeline() const { state_->tl.write(); }

}  // namespace ringflow::train
