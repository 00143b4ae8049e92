// The batched runner's queue and worker, and the closed-loop load generator.
#include "ringflow/serve/runner.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <atomic>
#include <exception>

namespace ringflow::serve {

namespace {

void check_options(const runner_options& o) {
  if (o.max_batch < 1 || o.max_queue < 1 || o.max_wait.count() < 0) {
    throw usage_error(fmt::format(
        "serve::runner: max_batch {} and max_queue {} must be at least 1 and max_wait ({} us) "
        "not negative",
        o.max_batch, o.max_queue, o.max_wait.count()));
  }
}

}  // namespace

runner::runner(std::shared_ptr<const model> m, runner_options options) : options_(options) {
  if (!m || m->empty()) throw usage_error("serve::runner: no model (null or empty)");
  inputs_ = m->inputs();
  outputs_ = m->outputs();
  fn_ = [m = std::move(m)](const float* x, index batch, float* y) { m->forward(x, batch, y); };
  check_options(options_);
  stats_.batch_sizes.assign(options_.max_batch + 1, 0);
  worker_ = std::thread([this] { work(); });
}

runner::runner(batch_function f, index inputs, index outputs, runner_options options)
    : fn_(std::move(f)), inputs_(inputs), outputs_(outputs), options_(options) {
  if (!fn_ || inputs < 1 || outputs < 1) {
    throw usage_error(
        fmt::format("serve::runner: needs a function and at least one input and "
                    "output (got {} and {})",
                    inputs, outputs));
  }
  check_options(options_);
  stats_.batch_sizes.assign(options_.max_batch + 1, 0);
  worker_ = std::thread([this] { work(); });
}

runner::~runner() { stop(); }

std::future<std::vector<float>> runner::submit(std::span<const float> input) {
  if (input.size() != static_cast<std::size_t>(inputs_)) {
    throw usage_error(fmt::format("serve::runner::submit: {} floats; the model takes {} per sample",
                                  input.size(), inputs_));
  }
  request r{std::vector<float>(input.begin(), input.end()), {}, std::chrono::steady_clock::now()};
  std::future<std::vector<float>> f = r.result.get_future();
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (stopping_) throw runner_stopped_error("serve::runner::submit: the runner has been stopped");
    if (queue_.size() >= options_.max_queue) {
      ++stats_.rejected;
      throw overloaded_error(fmt::format(
          "serve::runner: overloaded: {} requests are already waiting (max_queue {}); retry "
          "later, shed load, or raise runner_options::max_queue",
          queue_.size(), options_.max_queue));
    }
    queue_.push_back(std::move(r));
    ++stats_.requests;
  }
  cv_.notify_one();
  return f;
}

void runner::stop() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    stopping_ = true;
  }
  cv_.notify_all();
  std::lock_guard<std::mutex> lk(join_mu_);
  if (worker_.joinable()) worker_.join();
}

runner_stats runner::stats() const {
  std::lock_guard<std::mutex> lk(mu_);
  return stats_;
}

std::size_t runner::queued() const {
  std::lock_guard<std::mutex> lk(mu_);
  return queue_.size();
}

void runner::work() {
  std::vector<request> batch;
  batch.reserve(options_.max_batch);
  std::vector<float> x, y;
  for (;;) {
    {
      std::unique_lock<std::mutex> lk(mu_);
      cv_.wait(lk, [&] { return stopping_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stopping, and everything accepted has been answered
      // Wait for a full batch until the oldest request's deadline; when
      // stopping, run what is there at once.
      const auto deadline = queue_.front().arrived + options_.max_wait;
      cv_.wait_until(lk, deadline,
                     [&] { return stopping_ || queue_.size() >= options_.max_batch; });
      const std::size_t n = std::min(options_.max_batch, queue_.size());
      for (std::size_t i = 0; i < n; ++i) {
        batch.push_back(std::move(queue_.front()));
        queue_.pop_front();
      }
      ++stats_.batches;
      ++stats_.batch_sizes[n];
      stats_.largest_batch = std::max(stats_.largest_batch, n);
    }
    const auto n = static_cast<index>(batch.size());
    x.resize(static_cast<std::size_t>(n * inputs_));
    y.resize(static_cast<std::size_t>(n * outputs_));
    for (index i = 0; i < n; ++i) {
      std::copy(batch[static_cast<std::size_t>(i)].input.begin(),
                batch[static_cast<std::size_t>(i)].input.end(), x.begin() + i * inputs_);
    }
    try {
      fn_(x.data(), n, y.data());
      for (index i = 0; i < n; ++i) {
        batch[static_cast<std::size_t>(i)].result.set_value(
            std::vector<float>(y.begin() + i * outputs_, y.begin() + (i + 1) * outputs_));
      }
    } catch (...) {
      const std::exception_ptr e = std::current_exception();
      for (auto& r : batch) {
        try {
          r.result.set_exception(e);
        } catch (const std::future_error&) {
          // already answered before the failure
        }
      }
    }
    {
      std::lock_guard<std::mutex> lk(mu_);
      stats_.requests_run += static_cast<std::uint64_t>(n);
    }
    batch.clear();
  }
}

load_report run_load(runner& r, const float* inputs, index samples, const load_options& o) {
  if (samples < 1 || o.clients < 1 || o.in_flight < 1) {
    throw usage_error(
        fmt::format("serve::run_load: {} samples, {} clients, {} in flight: each must "
                    "be at least 1",
                    samples, o.clients, o.in_flight));
  }
  using clock = std::chrono::steady_clock;
  const runner_stats before = r.stats();
  std::vector<std::vector<double>> latencies(static_cast<std::size_t>(o.clients));
  std::vector<std::uint64_t> rejected(static_cast<std::size_t>(o.clients), 0);
  std::vector<std::exception_ptr> errors(static_cast<std::size_t>(o.clients));
  const auto start = clock::now();
  const auto end = start + o.duration;
  std::vector<std::thread> threads;
  for (int c = 0; c < o.clients; ++c) {
    threads.emplace_back([&, c] {
      const auto cu = static_cast<std::size_t>(c);
      try {
        std::deque<std::pair<std::future<std::vector<float>>, clock::time_point>> pending;
        index next = c % samples;
        for (;;) {
          const bool running = clock::now() < end;
          while (running && pending.size() < static_cast<std::size_t>(o.in_flight)) {
            const auto t = clock::now();
            try {
              pending.emplace_back(
                  r.submit(std::span<const float>(inputs + next * r.inputs(),
                                                  static_cast<std::size_t>(r.inputs()))),
                  t);
            } catch (const overloaded_error&) {
              ++rejected[cu];
              break;  // back off: wait for one of ours to finish
            }
            next = (next + 1) % samples;
          }
          if (pending.empty()) {
            if (!running) break;
            std::this_thread::yield();
            continue;
          }
          pending.front().first.get();
          latencies[cu].push_back(
              std::chrono::duration<double, std::micro>(clock::now() - pending.front().second)
                  .count());
          pending.pop_front();
        }
      } catch (...) {
        errors[cu] = std::current_exception();
      }
    });
  }
  for (auto& t : threads) t.join();
  const double seconds = std::chrono::duration<double>(clock::now() - start).count();
  for (const auto& e : errors) {
    if (e) std::rethrow_exception(e);
  }
  std::vector<double> all;
  load_report rep;
  for (std::size_t c = 0; c < latencies.size(); ++c) {
    all.insert(all.end(), latencies[c].begin(), latencies[c].end());
    rep.rejected += rejected[c];
  }
  std::sort(all.begin(), all.end());
  rep.completed = all.size();
  rep.seconds = seconds;
  rep.throughput = seconds > 0 ? static_cast<double>(all.size()) / seconds : 0.0;
  if (!all.empty()) {
    auto pct = [&](double p) {
      const auto i = static_cast<std::size_t>(p * static_cast<double>(all.size() - 1) + 0.5);
      return all[std::min(i, all.size() - 1)];
    };
    rep.p50_us = pct(0.50);
    rep.p99_us = pct(0.99);
  }
  const runner_stats after = r.stats();
  const auto batches = after.batches - before.batches;
  rep.mean_batch = batches == 0 ? 0.0
                                : static_cast<double>(after.requests_run - before.requests_run) /
                                      static_cast<double>(batches);
  return rep;
}

}  // namespace ringflow::serve
