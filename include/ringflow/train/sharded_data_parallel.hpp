// Sharded data parallelism (ZeRO stages 1-3): each rank keeps the optimizer state (stage 1), the
// averaged gradients (2) and the parameter values (3) of its piece of every bucket only.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <string_view>
#include <vector>

#include "ringflow/ad/parameter_store.hpp"
#include "ringflow/ad/tensor.hpp"
#include "ringflow/coll/options.hpp"
#include "ringflow/coll/partition.hpp"
#include "ringflow/comm/communicator.hpp"
#include "ringflow/train/data_parallel.hpp"
#include "ringflow/train/memory.hpp"
#include "ringflow/train/timeline.hpp"

namespace ringflow::train {

/// Options of sharded_data_parallel.
struct sharded_data_parallel_options {
  /// 1: optimizer state sharded; 2: gradients too; 3: parameter values too
  /// (gathered bucket by bucket when read); 0 is train::data_parallel.
  int stage = 1;
  /// The bucket plan, as for data_parallel (same caps: same buckets).
  std::size_t bucket_cap_bytes = default_bucket_cap_bytes;
  std::size_t first_bucket_cap_bytes = default_first_bucket_cap_bytes;
  int root = 0;
  bool broadcast_parameters = true;
  /// Segment size of the reduce-scatters and allgathers; the algorithm must
  /// be automatic or ring (both run the ring).
  coll_options coll = {};
  std::filesystem::path timeline_path = {};
  /// Uneven inputs, as data_parallel_options::uneven_inputs: one int32
  /// allreduce per step counts the ranks still training; join() works.
  /// Stages 1 and 2 only (at stage 3 a joined rank runs no forward, so it
  /// could not take part in the others' parameter gathers).
  bool uneven_inputs = false;
};

class sharded_data_parallel;

/// While alive, the model's parameters are whole on every rank (stage 3;
/// see sharded_data_parallel::full_parameters()). Move-only.
class full_parameters_scope {
 public:
  full_parameters_scope() = default;
  full_parameters_scope(full_parameters_scope&& o) noexcept
      : owner_(o.owner_), alive_(std::move(o.alive_)) {
    o.owner_ = nullptr;
  }
  full_parameters_scope& operator=(full_parameters_scope&&) = delete;
  full_parameters_scope(const full_parameters_scope&) = delete;
  /// Stage 3: copies this rank's pieces of the (perhaps reloaded) values into
  /// shard() and releases the values again. Local, never throws. After the
  /// trainer is gone it does nothing (the values stay whole).
  ~full_parameters_scope();

 private:
  friend class sharded_data_parallel;
  full_parameters_scope(sharded_data_parallel* owner, std::weak_ptr<void> alive)
      : owner_(owner), alive_(std::move(alive)) {}
  sharded_data_parallel* owner_ = nullptr;
  std::weak_ptr<void> alive_;  // expires with the trainer
};

/// ZeRO-style data-parallel trainer over a model's parameter store.
///
/// The buckets are data_parallel's (plan_buckets with the same caps). Rank r
/// owns piece r (ringflow::partition) of every bucket; the concatenation of
/// its pieces is shard(), a parameter store of about numel()/p elements over
/// which the caller builds the optimizer (ad::adamw, ad::sgd: unchanged).
///
/// Each step: during backward, as a bucket's gradients become final, its
/// reduce_scatter(avg) is queued on the progress thread (in bucket order, as
/// in data_parallel) and leaves the averaged piece in shard()'s gradients.
/// step(opt): finish(), copy the owned parameter values into shard(), run
/// opt.step() on the shard, and allgather every bucket's pieces back into the
/// full parameters. After it the parameters are bitwise identical on every
/// rank, and bitwise identical to data_parallel's with coll.algorithm =
/// algo::ring (ring allreduce is ring reduce-scatter + ring allgather; the
/// optimizers are per element). See docs/training.md, "Sharded data parallel".
///
/// Stage 1 keeps the model's full gradient buffer (after finish() it holds
/// this rank's own, unaveraged gradients; the averages are in shard()).
/// Stage 2 releases it (parameter_store::release_grads): each bucket's
/// gradients are copied into a bucket-sized staging buffer when final and
/// freed; the staging buffer is freed once its reduce_scatter has run. The
/// destructor packs the model's gradients again.
///
/// @code
///   ad::mlp model({784, 256, 10}, ad::activation::relu, 42);
///   train::sharded_data_parallel sdp(comm, model.parameters(), {.stage = 2});
///   ad::adamw opt(sdp.shard());            // optimizer state for this rank's piece only
///   for (...) {
///     opt.zero_grad();                     // the shard's gradients
///     sdp.backward(loss_of(model, batch));
///     sdp.step(opt);
///   }
/// @endcode
///
/// ad::clip_grad_norm(shard()) would clip by this rank's piece alone; use
/// clip_grad_norm() here, which takes the norm over all ranks.
///
/// Stage 3 also releases the model's flat value buffer
/// (parameter_store::release_values): a rank holds shard() (its pieces, the
/// authoritative values the optimizer updates) plus the buckets in use. The
/// first read of a released value (an op's input in forward or backward,
/// value(), data()) allgathers that parameter's whole bucket and starts the
/// next bucket's gather (the one before it in a forward, after it in a
/// backward: buckets are in reverse registration order). A forward keeps
/// the bucket it reads and its two neighbours and drops the others; the
/// backward drops a bucket once all its gradients are final; finish() drops
/// everything (the values are stale once the optimizer steps): between
/// steps a rank holds shard() only. So every
/// forward and backward at stage 3 is collective: every rank must run the
/// same ones (evaluate inside full_parameters(), where they are local).
/// After each step the parameters (gathered) are bitwise equal to stage
/// 2's, and so to data_parallel's with algo::ring.
///
/// Limits at stage 3: an op whose parameters lie two or more buckets apart
/// (weight tying across distant layers) must not be the first reader of both
/// (the second gather may drop the first); uneven_inputs is not supported;
/// the model's parameters are unusable after the trainer is gone unless
/// unshard() ran (their reads then throw usage_error).
class sharded_data_parallel {
 public:
  sharded_data_parallel(communicator comm, ad::parameter_store<float> params,
                        sharded_data_parallel_options opts = {});
  /// Waits for pending collectives (never throws), packs the model's
  /// gradients again (stage 2) and writes the timeline.
  ~sharded_data_parallel();
  sharded_data_parallel(const sharded_data_parallel&) = delete;
  sharded_data_parallel& operator=(const sharded_data_parallel&) = delete;

  /// This rank's piece of the parameters: build the optimizer over it. One
  /// parameter "shard" of shard_size() elements (0 on a rank whose pieces are
  /// all empty: the optimizer then has nothing to update).
  ad::parameter_store<float> shard() const;
  /// For bucket b, the piece this rank owns, as an offset into the model's
  /// flat buffers (all_values()) and a count.
  const std::vector<chunk>& owned() const;

  train::timeline::scoped_span span(std::string_view name) const;
  void backward(const ad::tensor& loss);
  /// Launches the buckets not launched yet, waits for all: shard()'s
  /// gradients then hold the average over ranks of this rank's pieces.
  void finish();
  /// finish() (unless the caller already ran it for this step, e.g. before
  /// clip_grad_norm(): a second reduction would average the consumed, zeroed
  /// model gradients), opt.step() on the shard, allgather of the parameters
  /// (stage 3: none; the next forward gathers what it reads).
  /// `opt` must be built over shard() (usage_error otherwise).
  template <class Optimizer>
  void step(Optimizer& opt) {
    check_optimizer(opt.parameters());
    if (!reduced()) finish();
    before_update();
    {
      auto s = trace().scope("optimizer", steps() - 1);
      opt.step();
    }
    after_update();
  }

  /// Stage 3: gathers every parameter into the model's store (one allgather
  /// per bucket; collective) for as long as the returned scope lives, so the
  /// model works like an unsharded one on each rank alone: evaluation on some
  /// ranks only, save_checkpoint / load_checkpoint over parameters(),
  /// all_values(). When the scope ends, this rank's pieces of the values
  /// (reloaded ones included) become shard()'s and the values are released
  /// again. backward(), finish() and step() inside it are usage_errors.
  /// Stages 1 and 2: the parameters are always whole; an empty scope.
  [[nodiscard]] full_parameters_scope full_parameters();
  /// Stage 3: gathers every parameter into the model's store for good
  /// (collective), so the model outlives the trainer; the trainer cannot
  /// step afterwards. No-op at stages 1 and 2.
  void unshard();

  /// Uneven inputs (needs uneven_inputs = true), as data_parallel::join():
  /// on a rank with no batch left, takes part in the other ranks' steps with
  /// zero gradients (not counted in the divisor), then runs before_step(step),
  /// opt.step() on its shard and the allgather, until every rank has called
  /// join(). Returns the steps shadowed.
  template <class Optimizer>
  std::int64_t join(Optimizer& opt, const std::function<void(std::int64_t)>& before_step = {}) {
    check_optimizer(opt.parameters());
    std::int64_t shadowed = 0;
    while (shadow_finish()) {
      before_update();
      if (before_step) before_step(steps() - 1);
      {
        auto s = trace().scope("optimizer", steps() - 1);
        opt.step();
      }
      after_update();
      ++shadowed;
    }
    return shadowed;
  }

  /// Scales shard()'s gradients so that the norm of the whole (averaged)
  /// gradient is at most max_norm; returns the norm before. Collective: call
  /// it on every rank, after finish() and before step(). (An allreduce of one
  /// double, counted in bytes_sent.)
  double clip_grad_norm(double max_norm);

  /// Gradient accumulation without communication: while the returned scope
  /// lives, backward() only accumulates (no bucket is launched, a parameter
  /// may report its gradient any number of times). The backward after the
  /// scope ends reduces the sum once. Scale each loss by 1/k for the mean.
  /// finish() or step() inside the scope is a usage_error. At stage 2 the
  /// accumulated gradients are held in full until that last backward.
  [[nodiscard]] no_sync_scope no_sync();

  int stage() const;
  const std::vector<bucket>& buckets() const;
  std::int64_t steps() const;
  /// Timing and bytes of the last finished step (bytes_sent: the reduce-
  /// scatters of finish() and the allgather of step(), counted exactly).
  const step_stats& last_step() const;
  const std::vector<std::uint32_t>& ready_counts() const;
  /// Bytes this rank holds now for parameters, gradients (model buffer,
  /// staging buffers, the shard's) and the optimizer's state (pass the
  /// optimizer: train::optimizer_state_bytes reads its buffers).
  memory_stats memory(std::size_t optimizer_state_bytes) const;
  template <class Optimizer>
  memory_stats memory(Optimizer& opt) const {
    return memory(optimizer_state_bytes(opt));
  }
  /// The largest gradient bytes held at any moment since construction
  /// (stage 2: what is in flight during backward).
  std::size_t peak_gradient_bytes() const;
  /// The largest parameter bytes held at any moment since construction
  /// (stage 3: shard() plus the gathered and prefetched buckets, counted
  /// from when the constructor released the model's values, not counting
  /// full_parameters() scopes and unshard(), which hold the whole model by
  /// design; stages 1 and 2: the model's values plus shard()).
  std::size_t peak_parameter_bytes() const;

  const communicator& comm() const;
  const ad::parameter_store<float>& parameters() const;
  const train::timeline& trace() const;
  void write_timeline() const;

 private:
  void check_optimizer(const ad::parameter_store<float>& optimized) const;
  bool shadow_finish();
  bool reduced() const;
  void before_update();
  void after_update();
  void gather_parameters();
  friend class full_parameters_scope;
  void reshard() noexcept;
  struct state;
  std::unique_ptr<state> state_;
  std::shared_ptr<void> alive_ = std::make_shared<char>();  // full_parameters_scope checks it
};

}  // namespace ringflow::train
