// The batched inference runner: many client threads submit single samples,
// one worker thread gathers them into batches (up to max_batch, or whatever
// has arrived when the oldest has waited max_wait), runs the model, and
// fulfils each client's future with its own row. The queue is bounded: a
// submit that finds it full is refused at once with overloaded_error.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <future>
#include <memory>
#include <mutex>
#include <span>
#include <thread>
#include <vector>

#include "ringflow/core/error.hpp"
#include "ringflow/serve/model.hpp"

namespace ringflow::serve {

/// A submit refused because max_queue requests are already waiting
/// (back-pressure: retry later, shed the request, or raise max_queue).
class overloaded_error : public error {
 public:
  using error::error;
};

/// A submit after stop() (or during the runner's destruction).
class runner_stopped_error : public error {
 public:
  using error::error;
};

struct runner_options {
  /// The largest batch the model is run on (>= 1).
  std::size_t max_batch = 32;
  /// How long the oldest waiting request may wait for others to join its
  /// batch before the batch runs with what is there (the deadline).
  std::chrono::microseconds max_wait{1000};
  /// Requests that may wait (not counting the batch that is running); a
  /// submit beyond them throws overloaded_error. Bounds the memory.
  std::size_t max_queue = 4096;
};

/// Counters since the runner started.
struct runner_stats {
  std::uint64_t requests = 0;  ///< accepted
  std::uint64_t rejected = 0;  ///< refused with overloaded_error
  std::uint64_t batches = 0;
  std::size_t largest_batch = 0;
  /// batch_sizes[b]: how many batches of b requests ran (size max_batch + 1).
  std::vector<std::uint64_t> batch_sizes;
  double mean_batch() const {
    return batches == 0 ? 0.0 : static_cast<double>(requests_run) / static_cast<double>(batches);
  }
  std::uint64_t requests_run = 0;  ///< answered (or failed) so far
};

/// What the runner runs: y [batch, outputs] = f(x [batch, inputs]).
using batch_function = std::function<void(const float* x, index batch, float* y)>;

/// @code
///   auto m = std::make_shared<const serve::model>(serve::load_model("mlp.int8.rfmodel"));
///   serve::runner r(m, {.max_batch = 32, .max_wait = std::chrono::microseconds(500)});
///   std::future<std::vector<float>> f = r.submit(image);   // from any thread
///   std::vector<float> logits = f.get();
/// @endcode
class runner {
 public:
  /// Serves `m` (shared: the runner keeps it alive).
  runner(std::shared_ptr<const model> m, runner_options options = {});
  /// Serves any batch function of `inputs` -> `outputs` floats per sample.
  runner(batch_function f, index inputs, index outputs, runner_options options = {});
  runner(const runner&) = delete;
  runner& operator=(const runner&) = delete;
  /// stop(): waits for the requests already accepted, then joins the worker.
  ~runner();

  /// Queues one sample (`inputs()` floats, copied); the future holds its
  /// `outputs()` results, or the exception the model threw. Throws
  /// usage_error for a wrong size, overloaded_error when the queue is full,
  /// runner_stopped_error after stop(). Thread-safe.
  std::future<std::vector<float>> submit(std::span<const float> input);

  /// Stops taking requests; every request already accepted still runs and is
  /// answered; returns when the worker has finished. Idempotent, thread-safe.
  void stop();

  runner_stats stats() const;
  /// Requests waiting now (not counting the running batch).
  std::size_t queued() const;
  const runner_options& options() const noexcept { return options_; }
  index inputs() const noexcept { return inputs_; }
  index outputs() const noexcept { return outputs_; }

 private:
  struct request {
    std::vector<float> input;
    std::promise<std::vector<float>> result;
    std::chrono::steady_clock::time_point arrived;
  };
  void work();

  batch_function fn_;
  index inputs_ = 0;
  index outputs_ = 0;
  runner_options options_;

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<request> queue_;
  bool stopping_ = false;
  runner_stats stats_;
  std::mutex join_mu_;  // serializes stop()'s join
  std::thread worker_;
};

/// How run_load drives a runner.
struct load_options {
  int clients = 8;     ///< client threads
  int in_flight = 16;  ///< requests each client keeps outstanding
  std::chrono::milliseconds duration{1000};
};

/// What run_load measured.
struct load_report {
  std::uint64_t completed = 0;
  std::uint64_t rejected = 0;  ///< overloaded_error seen by the clients (they back off and retry)
  double seconds = 0;
  double throughput = 0;  ///< completed requests per second
  double p50_us = 0;      ///< latency percentiles, submit to result, microseconds
  double p99_us = 0;
  double mean_batch = 0;  ///< the runner's mean batch over the run
};

/// A closed-loop load generator: `clients` threads each keep `in_flight`
/// requests outstanding, drawn in turn from `samples` rows of `inputs`
/// [samples, r.inputs()], for `duration`, then wait for the rest.
load_report run_load(runner& r, const float* inputs, index samples,
                     const load_options& options = {});

}  // namespace ringflow::serve
