// sharded_data_parallel: ZeRO stages 1-3 over data_parallel's buckets (reduce-scatter during
// backward, the optimizer on this rank's pieces, allgather of the parameters: after each step at
// stages 1 and 2, bucket by bucket when read at stage 3).
#include "ringflow/train/sharded_data_parallel.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <deque>
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
  // Stage 3. Each bucket's gathered values (null: not resident) and its
  // gather started ahead, both placed like the bucket's slice of the model's
  // flat value buffer modulo 64 bytes (as the stage-2 gradient buffers are),
  // so the products round alike.
  bool unsharded = false;
  bool in_backward = false;
  std::vector<std::shared_ptr<float>> bucket_values;
  std::vector<std::shared_ptr<float>> prefetch_values;
  std::vector<collective_handle> prefetch;
  std::deque<detail::span_record> gather_records;  // this step's gathers (stable addresses)
  std::size_t flat_values_mod64 = 0;
  std::size_t value_bytes = 0;  // gathered + prefetched buckets (stage 3)
  std::size_t peak_value_bytes = 0;

  int rank() const { return comm.rank(); }
  // Stage 3 with the model's values released: not inside a full_parameters()
  // scope, not after unshard().
  bool sharded() const { return params.values_released(); }

  std::span<float> shard_grads(std::size_t b) const {
    return shard.all_grads().subspan(shard_offset[b], owned[b].count);
  }
  std::span<float> shard_values(std::size_t b) const {
    return shard.all_values().subspan(shard_offset[b], owned[b].count);
  }

  std::size_t parameter_bytes_now() const {
    const std::size_t model = opts.stage >= 3 ? value_bytes + params.all_values().size_bytes()
                                              : params.numel() * sizeof(float);
    return model + shard_numel * sizeof(float);
  }
  void note_value_peak() { peak_value_bytes = std::max(peak_value_bytes, parameter_bytes_now()); }

  std::size_t gradient_bytes_now() const {
    const std::size_t model =
        opts.stage >= 2 ? bucket_grad_bytes.load() : params.all_grads().size_bytes();
    return model + shard_numel * sizeof(float);
  }
  void note_peak() { peak_grad_bytes = std::max(peak_grad_bytes, gradient_bytes_now()); }

  void reset_step() {
    t.reset();
    std::fill(records.begin(), records.end(), detail::span_record{});
    gather_records.clear();
    current = {};
  }

  // A zeroed buffer for bucket b placed at `mod64` + its offset, modulo 64
  // bytes; counted in *bytes.
  std::shared_ptr<float> placed_buffer(std::size_t b, std::size_t mod64, std::size_t& bytes) {
    const bucket& bk = buckets[b];
    constexpr std::size_t pad = 64 / sizeof(float);
    std::shared_ptr<float[]> mem(new float[bk.size + pad]());
    const auto addr = reinterpret_cast<std::uintptr_t>(mem.get());
    const std::size_t target = (mod64 + bk.offset * sizeof(float)) % 64;
    const std::size_t shift = ((target + 64 - addr % 64) % 64) / sizeof(float);
    bytes += placed_bytes(bk);
    return std::shared_ptr<float>(mem, mem.get() + shift);
  }
  static std::size_t placed_bytes(const bucket& bk) {
    return (bk.size + 64 / sizeof(float)) * sizeof(float);
  }

  // Stage 3: queues the allgather of bucket b's values into a new buffer.
  void start_gather(std::size_t b) {
    std::shared_ptr<float> buf = placed_buffer(b, flat_values_mod64, value_bytes);
    note_value_peak();
    const bucket& bk = buckets[b];
    const std::span<const float> in = shard_values(b);
    const std::span<float> out(buf.get(), bk.size);
    const coll_options coll = opts.coll;
    current.bytes_sent += ring_bytes_sent(bk.size, sizeof(float), comm.size(), rank(), false, true);
    ++current.parameter_gathers;
    detail::span_record* rec = &gather_records.emplace_back();
    prefetch[b] = detail::enqueue_timed(
        comm, rec, tl, t.step,
        [in, out, coll](const communicator& c) { allgather<float>(c, in, out, coll); },
        [out, b](trace_event& e) {
          e.name = fmt::format("allgather parameters bucket {}", b);
          e.bucket = static_cast<std::int64_t>(b);
          e.bytes = static_cast<std::int64_t>(out.size_bytes());
        });
    prefetch_values[b] = std::move(buf);
  }

  // Stage 3: the next bucket a forward (b - 1) or a backward (b + 1) reads,
  // gathered ahead unless resident or on its way.
  void prefetch_after(std::size_t b) {
    const bool backward = in_backward;
    if (!backward && b == 0) return;
    const std::size_t n = backward ? b + 1 : b - 1;
    if (n >= buckets.size() || bucket_values[n] || prefetch_values[n]) return;
    start_gather(n);
    ++current.prefetched_gathers;
  }

  // Stage 3: makes bucket b's values resident (waiting for its gather) and
  // points its parameters at them.
  void gather_values(std::size_t b) {
    if (!prefetch_values[b]) start_gather(b);
    std::exception_ptr failure;
    try {
      const double w0 = now_us();
      prefetch[b].wait();
      current.wait_s += (now_us() - w0) * 1e-6;
    } catch (...) {
      failure = std::current_exception();
    }
    std::shared_ptr<float> buf = std::move(prefetch_values[b]);
    prefetch_values[b].reset();
    if (failure) {
      value_bytes -= placed_bytes(buckets[b]);
      std::rethrow_exception(failure);
    }
    const bucket& bk = buckets[b];
    for (const std::size_t i : bk.params) {
      params[i].tensor.node()->value =
          std::shared_ptr<float>(buf, buf.get() + (params[i].offset - bk.offset));
    }
    bucket_values[b] = std::move(buf);
    if (!in_backward) {
      // A forward: keep this bucket and its neighbours (an op's parameters
      // may straddle two), drop the rest.
      for (std::size_t c = 0; c < buckets.size(); ++c) {
        if (c + 1 < b || c > b + 1) drop_values(c);
      }
    }
    prefetch_after(b);
  }

  // Stage 3: the value of parameter i, read while released.
  std::shared_ptr<float> value_of(std::size_t i) {
    const std::size_t b = t.bucket_of[i];
    if (!bucket_values[b]) gather_values(b);
    return std::shared_ptr<float>(bucket_values[b],
                                  bucket_values[b].get() + (params[i].offset - buckets[b].offset));
  }

  // Stage 3: releases bucket b's values (its parameters read them again by
  // gathering).
  void drop_values(std::size_t b) {
    if (!bucket_values[b]) return;
    for (const std::size_t i : buckets[b].params) params[i].tensor.node()->value.reset();
    bucket_values[b].reset();
    value_bytes -= placed_bytes(buckets[b]);
  }

  // Stage 3: waits for the gathers started ahead and drops every gathered
  // value (before the optimizer changes the shard they were read from).
  std::exception_ptr drop_all_values() noexcept {
    std::exception_ptr failure;
    for (std::size_t b = 0; b < buckets.size(); ++b) {
      if (prefetch_values[b]) {
        try {
          prefetch[b].wait();
        } catch (...) {
          if (!failure) failure = std::current_exception();
        }
        prefetch_values[b].reset();
        value_bytes -= placed_bytes(buckets[b]);
      }
      drop_values(b);
    }
    return failure;
  }

  void release_values() {
    state* self = this;
    params.release_values([self](std::size_t i) { return self->value_of(i); });
  }

  // Stage 3: every bucket gathered into one flat buffer given to the store.
  void pack_values() {
    if (const auto failure = drop_all_values()) std::rethrow_exception(failure);
    std::vector<float> flat(params.numel());
    std::vector<collective_handle> gathers;
    for (std::size_t b = 0; b < buckets.size(); ++b) {
      const bucket& bk = buckets[b];
      current.bytes_sent +=
          ring_bytes_sent(bk.size, sizeof(float), comm.size(), rank(), false, true);
      gathers.push_back(allgather_async(
          comm, shard_values(b), std::span<float>(flat).subspan(bk.offset, bk.size), opts.coll));
    }
    wait_all(std::span<collective_handle>(gathers));
    // Not noted as a peak of training: the scope holds the whole model by design.
    params.pack_values(std::move(flat));
  }

  // The model's values (authoritative: a checkpoint may have been loaded
  // into them) copied into this rank's pieces.
  void copy_owned_to_shard() {
    const auto values = params.all_values();
    for (std::size_t b = 0; b < buckets.size(); ++b) {
      const chunk& o = owned[b];
      std::copy_n(values.begin() + static_cast<std::ptrdiff_t>(o.offset), o.count,
                  shard_values(b).begin());
    }
  }

  void check_usable(const char* what) const {
    if (unsharded) {
      throw usage_error(fmt::format(
          "train::sharded_data_parallel on rank {}: {} after unshard(); the parameters are "
          "whole again and this trainer no longer steps them (build a new trainer)",
          rank(), what));
    }
    if (opts.stage >= 3 && !sharded()) {
      throw usage_error(fmt::format(
          "train::sharded_data_parallel on rank {}: {} inside a full_parameters() scope; end "
          "the scope first (its values would overwrite the update)",
          rank(), what));
    }
  }

  void on_ready(std::size_t i) {
    if (i >= t.fired.size() || !t.count_ready(i, params)) return;
    if (t.bucket_done(i)) {
      // Stage 3: every gradient of the bucket is final, so no closure of
      // this backward reads its values again.
      if (sharded()) drop_values(t.bucket_of[i]);
      while (t.next < buckets.size() && t.pending[t.next] == 0) {
        launch(t.next++);
        ++current.buckets_launched_in_backward;
      }
    }
  }

  // Stage 2: the gradient buffer of bucket b (zeros), made on first use.
  std::shared_ptr<float> bucket_buffer(std::size_t b) {
    if (bucket_grads[b]) return bucket_grads[b];
    std::size_t bytes = 0;
    bucket_grads[b] = placed_buffer(b, flat_grads_mod64, bytes);
    bucket_grad_bytes += bytes;
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
      staged_bytes = placed_bytes(bk);
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

  void wait_quietly() noexcept {
    t.wait_quietly({std::span<collective_handle>(handles), std::span<collective_handle>(prefetch)});
  }
};

sharded_data_parallel::sharded_data_parallel(communicator comm, ad::parameter_store<float> params,
                                             sharded_data_parallel_options opts)
    : state_(std::make_unique<state>()) {
  auto& s = *state_;
  if (!comm.valid()) {
    throw usage_error("train::sharded_data_parallel: the communicator is not valid");
  }
  const int rank = comm.rank();
  if (opts.stage == 0) {
    throw usage_error(fmt::format(
        "train::sharded_data_parallel on rank {}: stage 0 is plain data parallelism; use "
        "train::data_parallel (or stage 1, 2 or 3 here)",
        rank));
  }
  if (opts.stage < 1 || opts.stage > 3) {
    throw usage_error(fmt::format(
        "train::sharded_data_parallel on rank {}: stage {} does not exist; use 1 (optimizer "
        "state sharded), 2 (gradients too) or 3 (parameters too)",
        rank, opts.stage));
  }
  if (opts.stage == 3 && opts.uneven_inputs) {
    throw not_supported_error(fmt::format(
        "train::sharded_data_parallel on rank {}: uneven_inputs with stage 3: a joined rank "
        "runs no forward, so it cannot take part in the parameter gathers of the others; use "
        "stage 1 or 2 with uneven inputs",
        rank));
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
  s.bucket_values.resize(s.buckets.size());
  s.prefetch_values.resize(s.buckets.size());
  s.prefetch.resize(s.buckets.size());
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
  if (s.opts.stage >= 3) {
    s.flat_values_mod64 = reinterpret_cast<std::uintptr_t>(s.params.all_values().data()) % 64;
    s.copy_owned_to_shard();
    s.release_values();
  }
  s.note_peak();
  s.note_value_peak();
  state* raw = state_.get();
  s.params.set_grad_ready_hook([raw](std::size_t i, const ad::tensor&) { raw->on_ready(i); });
}

sharded_data_parallel::~sharded_data_parallel() {
  if (!state_) return;
  auto& s = *state_;
  s.params.set_grad_ready_hook(nullptr);
  s.wait_quietly();
  // A full_parameters() scope still alive: the values are whole and stay so.
  if (s.sharded()) {
    // The values are spread over the ranks and this trainer (which gathers
    // them) is going: a read from now on is an error that says so.
    (void)s.drop_all_values();
    const int rank = s.rank();
    std::vector<std::string> names;
    for (const auto& p : s.params) names.push_back(p.name);
    s.params.release_values([rank, names](std::size_t i) -> std::shared_ptr<float> {
      throw usage_error(fmt::format(
          "rank {}: parameter '{}' is sharded over the ranks by a stage-3 "
          "train::sharded_data_parallel that no longer exists; call unshard() (collective) "
          "before the trainer goes to keep the model whole",
          rank, names[i]));
    });
  }
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
  s.check_usable("backward()");
  s.reduced = false;  // a new step's gradients
  if (s.t.no_sync) ++s.t.accumulated_backwards;
  const double t0 = now_us();
  s.in_backward = true;
  try {
    ad::backward(loss);
  } catch (...) {
    s.in_backward = false;
    throw;
  }
  s.in_backward = false;
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
  s.check_usable("finish() (or step())");
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
  std::exception_ptr failure = s.t.wait_step({std::span<collective_handle>(s.handles)});
  // Stage 3: the values gathered for this step go (the optimizer is next).
  if (const auto dropped = s.drop_all_values(); dropped && !failure) failure = dropped;
  const double w1 = now_us();
  s.tl.record("wait", lane::compute, w0, w1, s.t.step);
  s.current.contributing_ranks = s.t.contributing(s.comm, s.opts.uneven_inputs);
  // The model's gradients are consumed: the next step accumulates from zero
  // (at stage 2 they were freed bucket by bucket already).
  if (s.opts.stage < 2) s.params.zero_grad();
  s.current.wait_s += (w1 - w0) * 1e-6;
  s.current.comm_s = detail::busy_seconds(s.records);
  for (const auto& r : s.gather_records) s.current.comm_s += (r.end_us - r.start_us) * 1e-6;
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
  if (s.opts.stage >= 3) {
    // The shard is authoritative; a value read since finish() is dropped
    // before the optimizer changes what it was gathered from.
    if (const auto failure = s.drop_all_values()) std::rethrow_exception(failure);
    return;
  }
  // The model's parameters are authoritative (a checkpoint may have been
  // loaded into them): the shard starts each update from their values.
  s.copy_owned_to_shard();
}

void sharded_data_parallel::after_update() {
  auto& s = *state_;
  if (s.opts.stage < 3) {
    gather_parameters();
    return;
  }
  // Stage 3: nothing gathered between steps; the next forward's reads gather.
  s.reduced = false;
}

full_parameters_scope sharded_data_parallel::full_parameters() {
  auto& s = *state_;
  if (s.opts.stage < 3 || s.unsharded) return full_parameters_scope();
  if (!s.sharded()) {
    throw usage_error(
        fmt::format("train::sharded_data_parallel on rank {}: full_parameters() inside another "
                    "full_parameters() scope",
                    s.rank()));
  }
  const double t0 = now_us();
  s.pack_values();
  s.tl.record("allgather (full parameters)", lane::compute, t0, now_us(), s.t.step);
  return full_parameters_scope(this, alive_);
}

void sharded_data_parallel::unshard() {
  auto& s = *state_;
  if (s.opts.stage < 3 || s.unsharded) return;
  if (!s.sharded()) {
    throw usage_error(fmt::format(
        "train::sharded_data_parallel on rank {}: unshard() inside a full_parameters() scope",
        s.rank()));
  }
  s.pack_values();
  s.unsharded = true;
}

void sharded_data_parallel::reshard() noexcept {
  auto& s = *state_;
  if (s.sharded() || s.unsharded) return;
  s.copy_owned_to_shard();
  s.release_values();
}

full_parameters_scope::~full_parameters_scope() {
  if (owner_ != nullptr && !alive_.expired()) owner_->reshard();
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
  return {s.parameter_bytes_now(), s.gradient_bytes_now(), optimizer_state_bytes};
}

std::size_t sharded_data_parallel::peak_gradient_bytes() const { return state_->peak_grad_bytes; }
std::size_t sharded_data_parallel::peak_parameter_bytes() const { return state_->peak_value_bytes; }
const communicator& sharded_data_parallel::comm() const { return state_->comm; }
const ad::parameter_store<float>& sharded_data_parallel::parameters() const {
  return state_->params;
}
const train::timeline& sharded_data_parallel::trace() const { return state_->tl; }
void sharded_data_parallel::write_timeline() const { state_->tl.write(); }

}  // namespace ringflow::train
