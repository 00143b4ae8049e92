// Model side of pipeline parallelism: cutting an ad::sequential into stages
// (balanced by measured cost or given), the stage_runner that runs them, and
// the 2-D data x pipeline grid of communicators.
#pragma once

#include <cstddef>
#include <functional>
#include <map>
#include <span>
#include <utility>
#include <vector>

#include "ringflow/ad/layers.hpp"
#include "ringflow/ad/parameter_store.hpp"
#include "ringflow/ad/tensor.hpp"
#include "ringflow/comm/communicator.hpp"
#include "ringflow/pipeline/executor.hpp"
#include "ringflow/pipeline/schedule.hpp"

namespace ringflow::pipeline {

/// Layers per stage for `stages` contiguous stages minimizing the cost of
/// the most expensive one (every stage gets at least one layer). Throws
/// usage_error when there are fewer layers than stages.
/// @code
///   auto counts = pipeline::balance_layers(std::vector<double>{4, 1, 2, 1, 4}, 3);  // {1, 3, 1}
/// @endcode
std::vector<std::size_t> balance_layers(std::span<const double> layer_costs, int stages);

/// Seconds of forward + backward of each layer of `model` on `rows` random
/// rows of width `input_features` (best of `repeats`). Parameter gradients
/// are left at zero. Measurements differ between ranks: allreduce them (avg)
/// before balance_layers so that every rank cuts the model the same way.
std::vector<double> measure_layer_costs(ad::sequential& model, ad::index input_features,
                                        ad::index rows = 64, int repeats = 3);

/// The output width of every layer of `model` for inputs of width
/// `input_features` (layers must map [B, k] to [B, k']).
std::vector<ad::index> layer_widths(ad::sequential& model, ad::index input_features);

/// A data x pipeline grid: world rank r is stage r % stages of pipeline
/// r / stages. `pipeline` links the stages of one pipeline (for the
/// executor), `data` links the same stage of every pipeline (for averaging
/// its gradients).
struct grid {
  communicator pipeline;
  communicator data;
  int pipeline_index = 0;  ///< which replica this rank belongs to
  int pipelines = 1;       ///< number of replicas (data-parallel width)
  int stage_rank = 0;      ///< this rank's position in its pipeline
};

/// Splits `world` into world.size() / ranks_per_pipeline pipelines (collective).
/// Throws usage_error when the size is not a multiple.
/// @code
///   auto g = pipeline::make_grid(world, 2);   // -np 4: 2 pipelines x 2 stages
/// @endcode
grid make_grid(const communicator& world, int ranks_per_pipeline);

/// The loss of one micro-batch: the MEAN over its rows (the runner weighs
/// micro-batches by their share of the batch). Default: softmax cross-entropy.
using loss_function =
    std::function<ad::tensor(const ad::tensor& output, std::span<const int> labels)>;

/// Runs the stages of an ad::sequential that live on one rank. Every rank
/// builds the whole model (same seed) and keeps only its stages' layers; the
/// parameters of those layers are packed into this rank's own store
/// (parameters()), with the model's names ("3.weight"). Do not call
/// model.parameters() afterwards: it would re-pack them.
///
/// A training run zeroes the gradients, splits the batch into the
/// schedule's micro-batches (sizes differ by at most one row), adds up
/// each micro-batch loss weighted by its share, so the gradients equal the
/// single-process gradients of the batch mean; REDUCE averages them over
/// the data-parallel communicator, STEP calls the optimizer callback.
/// @code
///   pipeline::sequential_stages stages(model, sched, comm.rank(), {3, 2}, 784);
///   ad::adamw opt(stages.parameters());
///   stages.set_optimizer_step([&] { opt.step(); });
///   pipeline::executor ex(comm, sched);
///   stages.set_batch(images, rows, labels);
///   ex.run(stages);
///   double loss = stages.loss();   // on the last stage's rank
/// @endcode
class sequential_stages : public stage_runner {
 public:
  /// `layers_per_stage[s]` consecutive layers of `model` form stage s
  /// (one entry per stage of `s`, summing to model.size()). `model` must
  /// outlive this object.
  sequential_stages(ad::sequential& model, const schedule& s, int rank,
                    std::vector<std::size_t> layers_per_stage, ad::index input_features);

  /// This rank's parameters (all its stages), one contiguous store.
  ad::parameter_store<float> parameters() const { return store_; }
  /// The stages this rank runs and their layer ranges [first, last).
  const std::vector<int>& local_stages() const { return local_; }
  std::pair<std::size_t, std::size_t> layer_range(int stage) const;

  /// The batch of the next run: `inputs` row-major [rows, input_features]
  /// (read on the first stage's rank only; may be null elsewhere), `labels`
  /// [rows] (read on the last stage's rank). Kept by pointer: keep them alive.
  void set_batch(const float* inputs, ad::index rows, std::span<const int> labels = {});
  void set_loss(loss_function f) { loss_ = std::move(f); }
  /// REDUCE averages gradients over `dp` (skipped when invalid or of size 1).
  void set_data_parallel(communicator dp) { dp_ = std::move(dp); }
  void set_optimizer_step(std::function<void()> f) { step_ = std::move(f); }

  /// The batch loss of the last training run (mean over rows) on the rank
  /// of the last stage; 0 on other ranks.
  double loss() const { return loss_sum_; }
  /// After a forward_only run, on the last stage's rank: the model output
  /// [rows, width]; empty elsewhere.
  const ad::matrix<float>& outputs() const { return outputs_; }
  /// Bytes of activations (stage inputs, every layer output) held at once
  /// at most, since construction or reset_peak().
  std::size_t peak_activation_bytes() const { return peak_bytes_; }
  void reset_peak() { peak_bytes_ = live_bytes_; }

  // stage_runner
  void begin_run(const schedule& s) override;
  void end_run() override;
  std::size_t input_elements(int stage, int mb) override;
  std::size_t output_elements(int stage, int mb) override;
  void forward(int stage, int mb, std::span<const float> input) override;
  std::span<const float> output(int stage, int mb) override;
  void backward(int stage, int mb, std::span<const float> grad_output, bool defer_weights) override;
  void backward_weight(int stage, int mb) override;
  std::span<const float> input_grad(int stage, int mb) override;
  void reduce_grads() override;
  void optimizer_step() override;

 private:
  struct slot {
    ad::tensor input;
    ad::tensor output;
    ad::tensor loss;
    ad::weight_grad_pass<float> pass;
    std::vector<float> input_grad;
    std::size_t bytes = 0;
  };
  slot& at(int stage, int mb, const char* what);
  void release(slot& s);
  ad::index rows_of(int mb) const;
  ad::index first_row_of(int mb) const;

  ad::sequential* model_;
  int rank_;
  int stages_;
  ad::index features_;
  std::vector<std::size_t> first_layer_;  // per stage, plus the end
  std::vector<ad::index> width_in_;       // per stage: input width
  std::vector<ad::index> width_out_;      // per stage: output width
  std::vector<int> local_;
  ad::parameter_store<float> store_;
  loss_function loss_;
  communicator dp_;
  std::function<void()> step_;
  const float* inputs_ = nullptr;
  ad::index rows_ = 0;
  std::span<const int> labels_;
  int micro_batches_ = 1;
  bool forward_only_ = false;
  std::map<std::pair<int, int>, slot> slots_;
  double loss_sum_ = 0;
  ad::matrix<float> outputs_;
  std::size_t live_bytes_ = 0;
  std::size_t peak_bytes_ = 0;
};

}  // namespace ringflow::pipeline
