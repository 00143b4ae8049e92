// Data-parallel training: gradients averaged across ranks in buckets whose allreduce overlaps
// backward.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "ringflow/ad/parameter_store.hpp"
#include "ringflow/ad/tensor.hpp"
#include "ringflow/coll/options.hpp"
#include "ringflow/comm/communicator.hpp"
#include "ringflow/compress/bucket_compression.hpp"
#include "ringflow/train/memory.hpp"
#include "ringflow/train/timeline.hpp"

namespace ringflow::train {

/// Default cap of a gradient bucket, chosen by measurement (docs/training.md,
/// bench/programs/bench_buckets.cpp --part sweep): on the 2-core development
/// machine with 4 oversubscribed ranks every extra allreduce costs scheduler
/// round trips and overlap has no idle core to use, so 1 MiB (two buckets for
/// the 0.9 MB Fashion-MNIST MLP) was as fast as one bucket and 1.6-2.2x faster
/// than 16-256 KiB; it still cuts 200 tensors of 4 KiB into 2 allreduces.
/// Machines with spare cores or a network to hide behind favour more buckets
/// (PyTorch DDP uses 25 MiB on GPUs); set data_parallel_options::bucket_cap_bytes.
inline constexpr std::size_t default_bucket_cap_bytes = 1024 * 1024;
/// Default cap of the first bucket (the last parameters, whose gradients are
/// ready first): small, so communication starts as early as possible.
inline constexpr std::size_t default_first_bucket_cap_bytes = 64 * 1024;

/// A contiguous slice [offset, offset + size) of the store's gradient buffer,
/// averaged by one allreduce.
struct bucket {
  std::size_t offset = 0;           ///< first element in all_grads()
  std::size_t size = 0;             ///< element count
  std::vector<std::size_t> params;  ///< parameter indices, in reverse store order
  std::size_t bytes() const { return size * sizeof(float); }
};

/// Cuts the parameters into buckets in reverse registration order (the order
/// backward produces gradients): bucket 0 holds the last parameters. A bucket
/// is closed before a parameter that would push it past its cap (the first
/// bucket's cap is `first_cap_bytes`, the others `cap_bytes`); a parameter
/// larger than the cap gets a bucket of its own. Because the store is one
/// buffer in registration order, every bucket is a contiguous slice: the
/// allreduce runs in place, with no copy. A cap of 0 puts every parameter in
/// its own bucket. Pure function of the layout: every rank gets the same plan.
std::vector<bucket> plan_buckets(const ad::parameter_store<float>& params, std::size_t cap_bytes,
                                 std::size_t first_cap_bytes);

/// What a comm hook gets for one bucket (see data_parallel_options::comm_hook).
struct bucket_view {
  /// The communicator to reduce on: data_parallel's progress-thread
  /// duplicate (collectives on it run in bucket order on every rank).
  const communicator& comm;
  /// The bucket's gradients, summed over this rank's backward passes; the
  /// hook leaves the average over the contributing ranks here, in place.
  std::span<float> grads;
  std::size_t index;  ///< the bucket (0: the last parameters)
  std::int64_t step;  ///< the step being reduced
  /// Ranks that contributed real gradients this step: comm.size(), or fewer
  /// with uneven_inputs after some ranks joined (theirs are zeros).
  int contributors;
};

/// Reduces one bucket (PyTorch DDP's register_comm_hook): called on the
/// progress thread, one bucket at a time in bucket order, on every rank.
/// It must leave the same values on every rank and may only communicate on
/// view.comm. The built-in hooks are allreduce_hook() and the compression
/// (data_parallel_options::compress).
using comm_hook_fn = std::function<void(const bucket_view& view)>;

/// The default hook: allreduce(avg) with `coll` when every rank contributed,
/// else allreduce(sum) divided by the contributors (one rounding, as avg).
comm_hook_fn allreduce_hook(coll_options coll = {});

/// Options of data_parallel.
struct data_parallel_options {
  std::size_t bucket_cap_bytes = default_bucket_cap_bytes;
  std::size_t first_bucket_cap_bytes = default_first_bucket_cap_bytes;
  /// The rank whose initial parameters every rank starts from.
  int root = 0;
  /// Broadcast the root's parameters in the constructor (off: the caller
  /// guarantees identical parameters, e.g. after loading a checkpoint).
  bool broadcast_parameters = true;
  /// Algorithm and segment size of the bucket allreduces.
  coll_options coll = {};
  /// Where to write the trace; empty: RINGFLOW_TIMELINE, or no trace.
  std::filesystem::path timeline_path = {};
  /// Gradient compression of the buckets: a compress::make_compressor spec
  /// (none|fp16|bf16|int8[:block]|topk:<ratio>|sign[:block]|powersgd:<rank>)
  /// or "auto". Anything but "none" averages each bucket through a
  /// compress::bucket_compression (one compressor and residual per bucket)
  /// instead of allreduce(avg); `coll` is then unused. A bad spec throws
  /// usage_error from the constructor.
  std::string compress = "none";
  /// Seed, error feedback and `auto` candidates of the compression.
  compress::bucket_compression_options compress_options = {};
  /// Uneven inputs (PyTorch's Join, hvd.join): every step first allreduces
  /// one int32, the count of ranks still training, so that a rank that has
  /// run out of batches can call join() and the others divide by the ranks
  /// that contributed. Off: no extra collective, join() is a usage_error.
  /// Must be the same on every rank. Not with compression (not_supported_error).
  bool uneven_inputs = false;
  /// How each bucket is reduced; empty: allreduce_hook(coll), or the
  /// compression when `compress` is not "none" (a hook and a compression
  /// together are a usage_error). The same hook on every rank.
  /// @code
  ///   opts.comm_hook = [](const train::bucket_view& v) {   // fp32 sum, then scale
  ///     allreduce(v.comm, v.grads, ringflow::sum, ringflow::algo::ring);
  ///     for (float& g : v.grads) g /= static_cast<float>(v.contributors);
  ///   };
  /// @endcode
  comm_hook_fn comm_hook = {};
};

/// Timing of one step (seconds), measured on this rank.
struct step_stats {
  double backward_s = 0;  ///< inside backward()
  double comm_s = 0;      ///< sum of the bucket allreduces (on the progress thread)
  double wait_s = 0;      ///< finish() blocked waiting for them (communication not hidden)
  std::size_t buckets_launched_in_backward = 0;  ///< buckets started before finish()
  /// Bytes this rank sent for the step's gradient (and, sharded, parameter)
  /// collectives. data_parallel counts what the ring allreduce of its buckets
  /// sends (exact with coll.algorithm = algo::ring; other algorithms send
  /// other amounts) or, compressed, the compressed bytes; sharded_data_parallel
  /// counts its ring reduce-scatters and allgathers exactly.
  std::uint64_t bytes_sent = 0;
  /// Backward passes accumulated under no_sync() before this step's reduction.
  std::size_t accumulated_backwards = 0;
  /// Ranks whose gradients the step averaged: the communicator's size, or
  /// with uneven_inputs the ranks that had not joined (the divisor).
  int contributing_ranks = 0;
  /// sharded_data_parallel stage 3: bucket allgathers of parameter values
  /// the step made (forward and backward), and how many of them had been
  /// started ahead (prefetched) rather than when a value was first read.
  std::size_t parameter_gathers = 0;
  std::size_t prefetched_gathers = 0;
};

/// While alive, the trainer that made it only accumulates gradients (see
/// data_parallel::no_sync). Move-only; ends the accumulation when destroyed.
class no_sync_scope {
 public:
  explicit no_sync_scope(bool* flag) : flag_(flag) { *flag_ = true; }
  no_sync_scope(no_sync_scope&& o) noexcept : flag_(o.flag_) { o.flag_ = nullptr; }
  no_sync_scope& operator=(no_sync_scope&&) = delete;
  no_sync_scope(const no_sync_scope&) = delete;
  ~no_sync_scope() {
    if (flag_ != nullptr) *flag_ = false;
  }

 private:
  bool* flag_;
};

/// Bytes the ring sends from rank `rank` for a reduce-scatter (and, with
/// `gather`, the allgather after it: the ring allreduce) of `count` elements
/// of `elem_bytes` over `ranks`: every piece but the rank's own
/// (reduce-scatter) and every piece but its right neighbour's (allgather).
std::uint64_t ring_bytes_sent(std::size_t count, std::size_t elem_bytes, int ranks, int rank,
                              bool reduce, bool gather);

/// Data-parallel wrapper over a model's parameter store.
///
/// The constructor checks that every rank has the same parameter layout,
/// broadcasts the root's parameters, and installs the store's grad-ready
/// hook. During backward, when the last gradient of a bucket is final its
/// allreduce(avg) is queued on the communicator's progress thread
/// (coll/async.hpp), so it runs while backward continues. Buckets are always
/// launched in bucket order (0, 1, 2, ...): a bucket that is ready early waits
/// for the ones before it, so every rank queues the same collectives in the
/// same order whatever order its hooks fire in.
///
/// finish() ends the step: it launches every bucket not launched yet, in
/// order, after setting to zero the gradient of each parameter that got none
/// in this step (a parameter unused by this rank's forward contributes zero to
/// the average, on this rank only), then waits for all of them. After it the
/// gradient buffer holds the average over ranks, bit-identical on every rank.
///
/// @code
///   ad::mlp model({784, 256, 10}, ad::activation::relu, 42);
///   train::data_parallel dp(comm, model.parameters());
///   ad::adamw opt(model.parameters());
///   for (...) {
///     opt.zero_grad();
///     ad::tensor loss;
///     { auto f = dp.span("forward"); loss = ad::softmax_cross_entropy(model(x), labels); }
///     dp.backward(loss);   // allreduces start inside
///     dp.step(opt);        // finish() + opt.step()
///   }
/// @endcode
///
/// The data_parallel owns the store's grad-ready hook while it lives: do not
/// install another one (the buckets would then only launch at finish(), with
/// the gradients of parameters whose hook "did not fire" set to zero).
///
/// One backward per step: a parameter reporting its gradient twice before
/// finish() is a usage_error, unless the earlier backwards ran inside
/// no_sync() (gradient accumulation). Collectives the caller runs on `comm` itself (say, a loss
/// allreduce) do not mix with the bucket traffic, which uses a duplicate.
class data_parallel {
 public:
  data_parallel(communicator comm, ad::parameter_store<float> params,
                data_parallel_options opts = {});
  /// Waits for pending buckets (never throws; failures are logged) and writes
  /// the timeline if one is on.
  ~data_parallel();
  data_parallel(data_parallel&&) noexcept;
  data_parallel& operator=(data_parallel&&) noexcept;
  data_parallel(const data_parallel&) = delete;
  data_parallel& operator=(const data_parallel&) = delete;

  /// RAII span on the compute lane of the timeline (e.g. "forward").
  train::timeline::scoped_span span(std::string_view name) const;

  /// ad::backward(loss) inside a "backward" span; buckets launch from the
  /// hooks as their gradients complete. (Calling loss.backward() directly
  /// works too; only the span is missing.)
  void backward(const ad::tensor& loss);

  /// Launches the buckets not launched yet and waits for all; the gradients
  /// are then averaged. Rethrows a failed allreduce (a comm_error naming the
  /// rank that failed). Calling it twice in a row is fine (the second call
  /// averages again: call it once per step).
  void finish();

  /// Gradient accumulation without communication (PyTorch DDP's no_sync):
  /// while the returned scope lives, backward() launches no bucket and only
  /// accumulates into the gradient buffer; the first backward after the scope
  /// ends reduces the sum of all of them once. For the mean over k
  /// micro-batches scale each loss by 1/k. finish() or step() inside the
  /// scope is a usage_error.
  /// @code
  ///   for (int i = 0; i < k - 1; ++i) { auto ns = dp.no_sync(); dp.backward(loss(i) * (1.0f / k));
  ///   } dp.backward(loss(k - 1) * (1.0f / k));   // buckets launched as usual dp.step(opt);
  /// @endcode
  [[nodiscard]] no_sync_scope no_sync();

  /// Bytes of parameters and gradients (numel() floats each: replicated) and
  /// of the optimizer's state.
  memory_stats memory(std::size_t optimizer_state_bytes) const;
  template <class Optimizer>
  memory_stats memory(Optimizer& opt) const {
    return memory(optimizer_state_bytes(opt));
  }

  /// finish(), then opt.step() inside an "optimizer" span.
  template <class Optimizer>
  void step(Optimizer& opt) {
    finish();
    auto s = trace().scope("optimizer", steps() - 1);  // the step just finished
    opt.step();
  }

  /// Uneven inputs: call on a rank that has no batch left (needs
  /// uneven_inputs = true). It takes part in the other ranks' steps with a
  /// zero contribution, not counted in the divisor: each step averages over
  /// the ranks that have not joined, sum / contributing_ranks. After each
  /// such step it runs `before_step(step)` (e.g. to set the learning rate of
  /// that step) and opt.step() on the averaged gradient, so parameters and
  /// optimizer state stay bitwise identical to the other ranks'. Returns when
  /// every rank has called join() (the number of steps it shadowed); every
  /// rank must call it, the last one returns 0 at once. Training may go on
  /// afterwards (the next epoch). A backward not yet finished, or a no_sync
  /// scope, is a usage_error.
  /// @code
  ///   for (auto& batch : my_batches) { opt.zero_grad(); dp.backward(loss(batch)); dp.step(opt); }
  ///   dp.join(opt, [&](std::int64_t t) { opt.set_lr(schedule(t)); });
  /// @endcode
  template <class Optimizer>
  std::int64_t join(Optimizer& opt, const std::function<void(std::int64_t)>& before_step = {}) {
    std::int64_t shadowed = 0;
    while (shadow_step()) {
      if (before_step) before_step(steps() - 1);
      auto s = trace().scope("optimizer", steps() - 1);
      opt.step();
      ++shadowed;
    }
    return shadowed;
  }

  /// One step of join() without the optimizer: sends the "not training"
  /// count and, if some rank still trains, a zero contribution to every
  /// bucket (the gradients then hold the average, as after finish()).
  /// Returns false, without a step, once no rank trains any more.
  bool shadow_step();

  const std::vector<bucket>& buckets() const;
  /// Steps finished so far (finish() calls).
  std::int64_t steps() const;
  /// Timing of the last finished step.
  const step_stats& last_step() const;
  /// How many times each parameter's grad-ready hook fired in the last
  /// finished step (1 for every parameter backward reached, 0 for unused).
  const std::vector<std::uint32_t>& ready_counts() const;

  /// The compression spec in use ("none" when the buckets are plain allreduces).
  const std::string& compression() const;
  /// Cumulative traffic of the compressed bucket reductions since
  /// construction (bytes_sent vs plain_bytes_sent, the fp32 ring's bytes);
  /// all zeros when compression is "none". Read it between steps (after
  /// finish()), not while buckets are in flight.
  compress::traffic compression_traffic() const;
  /// The compressor bucket `b` uses ("" before its first reduction, "none"
  /// without compression); in `auto` mode the cost model's choice.
  std::string compression_of(std::size_t b) const;
  /// The per-bucket compression (null when compression is "none"): put it
  /// in training_state::compression so checkpoints save and restore its
  /// residuals, counters and warm starts.
  compress::bucket_compression* bucket_compression() const;

  const communicator& comm() const;
  const ad::parameter_store<float>& parameters() const;
  const train::timeline& trace() const;
  /// Writes the timeline file now (also done by the destructor). Throws on failure.
  void write_timeline() const;

 private:
  struct state;
  std::unique_ptr<state> state_;
};

}  // namespace ringflow::train
