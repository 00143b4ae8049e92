// Cutting an ad::sequential into pipeline stages, running them, and the data x pipeline grid.
#include "ringflow/pipeline/stages.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <chrono>
#include <limits>
#include <numeric>
#include <optional>
#include <random>

#include "ringflow/ad/ops.hpp"
#include "ringflow/coll/collectives.hpp"
#include "ringflow/core/error.hpp"

namespace ringflow::pipeline {

std::vector<std::size_t> balance_layers(std::span<const double> layer_costs, int stages) {
  const std::size_t n = layer_costs.size();
  if (stages < 1 || n < static_cast<std::size_t>(stages)) {
    throw usage_error(fmt::format(
        "pipeline::balance_layers: {} layers cannot make {} stages of at least one layer each", n,
        stages));
  }
  const auto k = static_cast<std::size_t>(stages);
  std::vector<double> prefix(n + 1, 0.0);
  for (std::size_t i = 0; i < n; ++i) prefix[i + 1] = prefix[i] + layer_costs[i];
  // best[j][i]: the smallest possible maximum stage cost of the first i
  // layers cut into j stages; cut[j][i] where the last of them begins.
  constexpr double inf = std::numeric_limits<double>::infinity();
  std::vector<std::vector<double>> best(k + 1, std::vector<double>(n + 1, inf));
  std::vector<std::vector<std::size_t>> cut(k + 1, std::vector<std::size_t>(n + 1, 0));
  best[0][0] = 0.0;
  for (std::size_t j = 1; j <= k; ++j) {
    for (std::size_t i = j; i <= n; ++i) {
      for (std::size_t c = j - 1; c < i; ++c) {
        const double v = std::max(best[j - 1][c], prefix[i] - prefix[c]);
        if (v < best[j][i]) {
          best[j][i] = v;
          cut[j][i] = c;
        }
      }
    }
  }
  std::vector<std::size_t> counts(k);
  std::size_t end = n;
  for (std::size_t j = k; j >= 1; --j) {
    counts[j - 1] = end - cut[j][end];
    end = cut[j][end];
  }
  return counts;
}

std::vector<ad::index> layer_widths(ad::sequential& model, ad::index input_features) {
  ad::no_grad guard;
  auto x = ad::tensor::zeros({1, input_features});
  std::vector<ad::index> widths;
  for (std::size_t i = 0; i < model.size(); ++i) {
    x = model[i](x);
    if (x.shape().rank() != 2 || x.rows() != 1) {
      throw usage_error(fmt::format(
          "pipeline: layer {} of the model turns a [1,{}] input into {}; pipeline stages need "
          "layers that map [B, k] to [B, k']",
          i, widths.empty() ? input_features : widths.back(), x.shape().str()));
    }
    widths.push_back(x.cols());
  }
  return widths;
}

std::vector<double> measure_layer_costs(ad::sequential& model, ad::index input_features,
                                        ad::index rows, int repeats) {
  const auto widths = layer_widths(model, input_features);
  std::mt19937_64 rng(12345);
  std::normal_distribution<float> normal;
  std::vector<double> costs;
  for (std::size_t i = 0; i < model.size(); ++i) {
    const ad::index in = i == 0 ? input_features : widths[i - 1];
    std::vector<float> values(static_cast<std::size_t>(rows * in));
    for (auto& v : values) v = normal(rng);
    double best = std::numeric_limits<double>::infinity();
    for (int rep = 0; rep < std::max(1, repeats); ++rep) {
      auto x = ad::tensor::from_vector(values, {rows, in}, true);
      const auto t0 = std::chrono::steady_clock::now();
      auto loss = ad::sum(model[i](x));
      loss.backward();
      const auto t1 = std::chrono::steady_clock::now();
      best = std::min(best, std::chrono::duration<double>(t1 - t0).count());
    }
    costs.push_back(best);
    ad::named_parameters<float> params;
    model[i].collect_parameters(params, "");
    for (auto& p : params) p.second.zero_grad();
  }
  return costs;
}

grid make_grid(const communicator& world, int ranks_per_pipeline) {
  if (ranks_per_pipeline < 1 || world.size() % ranks_per_pipeline != 0) {
    throw usage_error(fmt::format(
        "pipeline::make_grid on rank {}: {} ranks cannot form pipelines of {} stages; use a "
        "stage count that divides the number of ranks",
        world.rank(), world.size(), ranks_per_pipeline));
  }
  grid g;
  g.pipelines = world.size() / ranks_per_pipeline;
  g.pipeline_index = world.rank() / ranks_per_pipeline;
  g.stage_rank = world.rank() % ranks_per_pipeline;
  g.pipeline = world.split(g.pipeline_index, g.stage_rank);
  g.data = world.split(g.stage_rank, g.pipeline_index);
  return g;
}

// ---------------------------------------------------------------------------
// sequential_stages

sequential_stages::sequential_stages(ad::sequential& model, const schedule& s, int rank,
                                     std::vector<std::size_t> layers_per_stage,
                                     ad::index input_features)
    : model_(&model), rank_(rank), stages_(s.stages()), features_(input_features) {
  if (static_cast<int>(layers_per_stage.size()) != stages_) {
    throw usage_error(fmt::format(
        "pipeline::sequential_stages on rank {}: {} layer counts given for the {} stages of "
        "schedule '{}'",
        rank, layers_per_stage.size(), stages_, s.name));
  }
  const std::size_t total =
      std::accumulate(layers_per_stage.begin(), layers_per_stage.end(), std::size_t{0});
  const bool empty_stage =
      std::find(layers_per_stage.begin(), layers_per_stage.end(), 0) != layers_per_stage.end();
  if (total != model.size() || empty_stage) {
    throw usage_error(fmt::format(
        "pipeline::sequential_stages on rank {}: layer counts {} must be at least 1 each and add "
        "up to the model's {} layers",
        rank, fmt::join(layers_per_stage, ","), model.size()));
  }
  const auto widths = layer_widths(model, input_features);
  first_layer_.push_back(0);
  for (auto c : layers_per_stage) first_layer_.push_back(first_layer_.back() + c);
  for (int st = 0; st < stages_; ++st) {
    const auto a = first_layer_[static_cast<std::size_t>(st)];
    const auto b = first_layer_[static_cast<std::size_t>(st) + 1];
    width_in_.push_back(a == 0 ? input_features : widths[a - 1]);
    width_out_.push_back(widths[b - 1]);
  }
  local_ = s.stages_on(rank);
  ad::named_parameters<float> params;
  for (int st : local_) {
    for (auto i = first_layer_[static_cast<std::size_t>(st)];
         i < first_layer_[static_cast<std::size_t>(st) + 1]; ++i) {
      model[i].collect_parameters(params, std::to_string(i) + ".");
    }
  }
  if (!params.empty()) store_.pack(params);
  loss_ = [](const ad::tensor& out, std::span<const int> labels) {
    return ad::softmax_cross_entropy(out, labels);
  };
}

std::pair<std::size_t, std::size_t> sequential_stages::layer_range(int stage) const {
  return {first_layer_.at(static_cast<std::size_t>(stage)),
          first_layer_.at(static_cast<std::size_t>(stage) + 1)};
}

void sequential_stages::set_batch(const float* inputs, ad::index rows,
                                  std::span<const int> labels) {
  inputs_ = inputs;
  rows_ = rows;
  labels_ = labels;
}

ad::index sequential_stages::first_row_of(int mb) const {
  const ad::index m = micro_batches_;
  return mb * (rows_ / m) + std::min<ad::index>(mb, rows_ % m);
}

ad::index sequential_stages::rows_of(int mb) const {
  const ad::index m = micro_batches_;
  return rows_ / m + (mb < rows_ % m ? 1 : 0);
}

void sequential_stages::begin_run(const schedule& s) {
  micro_batches_ = s.micro_batches;
  forward_only_ = s.forward_only;
  if (rows_ < micro_batches_) {
    throw usage_error(fmt::format(
        "pipeline::sequential_stages on rank {}: a batch of {} rows cannot be cut into {} "
        "micro-batches; call set_batch with at least as many rows as micro-batches",
        rank_, rows_, micro_batches_));
  }
  const bool has_first = !local_.empty() && local_.front() == 0;
  const bool has_last = !local_.empty() && local_.back() == stages_ - 1;
  if (has_first && inputs_ == nullptr) {
    throw usage_error(fmt::format(
        "pipeline::sequential_stages on rank {}: this rank runs stage 0 but set_batch gave no "
        "inputs",
        rank_));
  }
  if (has_last && !forward_only_ && labels_.size() != static_cast<std::size_t>(rows_)) {
    throw usage_error(fmt::format(
        "pipeline::sequential_stages on rank {}: this rank runs the last stage and needs {} "
        "labels, got {}",
        rank_, rows_, labels_.size()));
  }
  slots_.clear();
  loss_sum_ = 0;
  if (forward_only_) {
    for (int st : local_) {
      for (auto i = first_layer_[static_cast<std::size_t>(st)];
           i < first_layer_[static_cast<std::size_t>(st) + 1]; ++i) {
        (*model_)[i].eval();
      }
    }
    outputs_.resize(has_last ? rows_ : 0, has_last ? width_out_.back() : 0);
  } else {
    store_.zero_grad();
  }
}

void sequential_stages::end_run() {
  for (auto& [k, s] : slots_) release(s);
  slots_.clear();
  if (forward_only_) {
    for (int st : local_) {
      for (auto i = first_layer_[static_cast<std::size_t>(st)];
           i < first_layer_[static_cast<std::size_t>(st) + 1]; ++i) {
        (*model_)[i].train();
      }
    }
  }
}

std::size_t sequential_stages::input_elements(int stage, int mb) {
  return static_cast<std::size_t>(rows_of(mb) * width_in_.at(static_cast<std::size_t>(stage)));
}

std::size_t sequential_stages::output_elements(int stage, int mb) {
  return static_cast<std::size_t>(rows_of(mb) * width_out_.at(static_cast<std::size_t>(stage)));
}

sequential_stages::slot& sequential_stages::at(int stage, int mb, const char* what) {
  auto it = slots_.find({stage, mb});
  if (it == slots_.end()) {
    throw usage_error(fmt::format(
        "pipeline::sequential_stages on rank {}: {} of stage {} micro-batch {} before its "
        "forward",
        rank_, what, stage, mb));
  }
  return it->second;
}

void sequential_stages::release(slot& s) {
  live_bytes_ -= s.bytes;
  s = slot{};
}

void sequential_stages::forward(int stage, int mb, std::span<const float> input) {
  std::optional<ad::no_grad> guard;
  if (forward_only_) guard.emplace();
  const ad::index rows = rows_of(mb);
  const auto st = static_cast<std::size_t>(stage);
  slot& s = slots_[{stage, mb}];
  if (stage == 0) {
    s.input = ad::tensor::from_data(inputs_ + first_row_of(mb) * features_, {rows, features_});
  } else {
    s.input = ad::tensor::from_vector(std::vector<float>(input.begin(), input.end()),
                                      {rows, width_in_[st]}, !forward_only_);
  }
  auto y = s.input;
  std::size_t elements = stage == 0 ? 0 : static_cast<std::size_t>(y.numel());
  for (auto i = first_layer_[st]; i < first_layer_[st + 1]; ++i) {
    y = (*model_)[i](y);
    elements += static_cast<std::size_t>(y.numel());
  }
  s.output = y;
  s.bytes = elements * sizeof(float);
  live_bytes_ += s.bytes;
  peak_bytes_ = std::max(peak_bytes_, live_bytes_);
  if (stage != stages_ - 1) return;
  if (forward_only_) {
    outputs_.middleRows(first_row_of(mb), rows) = y.value();
    return;
  }
  const auto labels =
      labels_.subspan(static_cast<std::size_t>(first_row_of(mb)), static_cast<std::size_t>(rows));
  // Weighted by the micro-batch's share so the sum is the batch mean.
  s.loss = ad::scale(loss_(y, labels), static_cast<float>(rows) / static_cast<float>(rows_));
  loss_sum_ += s.loss.item();
}

std::span<const float> sequential_stages::output(int stage, int mb) {
  return at(stage, mb, "output").output.data();
}

void sequential_stages::backward(int stage, int mb, std::span<const float> grad_output,
                                 bool defer_weights) {
  slot& s = at(stage, mb, "backward");
  const ad::backward_options opts{.defer_weight_grads = defer_weights};
  if (stage == stages_ - 1) {
    s.pass = ad::backward(s.loss, opts);
  } else {
    auto g = ad::tensor::from_vector(std::vector<float>(grad_output.begin(), grad_output.end()),
                                     s.output.shape());
    s.pass = ad::backward(s.output, g, opts);
  }
  if (stage > 0) {
    const auto gd = s.input.grad_data();
    s.input_grad.assign(gd.begin(), gd.end());
  }
  if (!defer_weights) {
    // Keep only the input gradient (for SG); the graph can go.
    auto keep = std::move(s.input_grad);
    release(s);
    s.input_grad = std::move(keep);
  }
}

void sequential_stages::backward_weight(int stage, int mb) {
  slot& s = at(stage, mb, "backward_weight");
  s.pass.run();
  auto keep = std::move(s.input_grad);
  release(s);
  s.input_grad = std::move(keep);
}

std::span<const float> sequential_stages::input_grad(int stage, int mb) {
  return at(stage, mb, "input_grad").input_grad;
}

void sequential_stages::reduce_grads() {
  if (dp_.valid() && dp_.size() > 1) allreduce(dp_, store_.all_grads(), avg);
}

void sequential_stages::optimizer_step() {
  if (step_) step_();
}

}  // namespace ringflow::pipeline
