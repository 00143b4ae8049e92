// Batch assembly and the background prefetcher.
#include "ringflow/data/batch.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cstring>

#include "ringflow/core/error.hpp"

namespace ringflow::data {

void assemble_batch(const dataset& ds, std::span<const std::size_t> indices, batch& out) {
  const std::size_t b = indices.size();
  const std::size_t f = ds.features();
  if (static_cast<std::size_t>(out.images.rows()) != b ||
      static_cast<std::size_t>(out.images.cols()) != f) {
    out.images.resize(static_cast<Eigen::Index>(b), static_cast<Eigen::Index>(f));
  }
  out.labels.resize(b);
  float* dst = out.images.data();
  for (std::size_t r = 0; r < b; ++r) {
    const std::size_t i = indices[r];
    if (i >= ds.size()) {
      throw usage_error(fmt::format(
          "assemble_batch: sample index {} is out of range for a dataset of {} samples; build "
          "the sampler with this dataset's size",
          i, ds.size()));
    }
    std::memcpy(dst + r * f, ds.sample(i), f * sizeof(float));
    out.labels[r] = ds.labels[i];
  }
}

batch assemble_batch(const dataset& ds, std::span<const std::size_t> indices) {
  batch out;
  assemble_batch(ds, indices, out);
  return out;
}

std::size_t batch_count(std::size_t count, std::size_t batch_size, bool drop_last) {
  if (batch_size == 0) throw usage_error("batch size must be at least 1");
  return drop_last ? count / batch_size : (count + batch_size - 1) / batch_size;
}

prefetcher::prefetcher(const dataset& ds, std::span<const std::size_t> indices,
                       std::size_t batch_size, prefetch_options options)
    : dataset_(ds), indices_(indices.begin(), indices.end()), batch_size_(batch_size),
      depth_(options.depth),
      num_batches_(batch_count(indices.size(), batch_size, options.drop_last)) {
  if (depth_ > 0 && num_batches_ > 0) worker_ = std::thread([this] { run_worker(); });
}

prefetcher::~prefetcher() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_ = true;
  }
  space_.notify_all();
  if (worker_.joinable()) worker_.join();
}

std::span<const std::size_t> prefetcher::slice(std::size_t b) const {
  const std::size_t begin = b * batch_size_;
  const std::size_t end = std::min(begin + batch_size_, indices_.size());
  return std::span<const std::size_t>(indices_).subspan(begin, end - begin);
}

void prefetcher::run_worker() {
  // Any failure, including allocation, becomes error_: the consumer is woken
  // and rethrows it, so it never waits for a batch that will not come.
  try {
    for (std::size_t b = 0; b < num_batches_; ++b) {
      batch item;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        space_.wait(lock, [this] { return stop_ || queue_.size() < depth_; });
        if (stop_) return;
        if (!spare_.empty()) {
          item = std::move(spare_.back());
          spare_.pop_back();
        }
      }
      assemble_batch(dataset_, slice(b), item);
      {
        std::lock_guard<std::mutex> lock(mutex_);
        queue_.push_back(std::move(item));
      }
      ready_.notify_all();
    }
  } catch (...) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      error_ = std::current_exception();
    }
    ready_.notify_all();
  }
}

bool prefetcher::next(batch& out) {
  if (consumed_ >= num_batches_) return false;
  if (depth_ == 0) {
    assemble_batch(dataset_, slice(consumed_), out);
    ++consumed_;
    return true;
  }
  std::unique_lock<std::mutex> lock(mutex_);
  // The worker either produces this batch or records an error: no hang.
  ready_.wait(lock, [this] { return !queue_.empty() || error_ != nullptr; });
  if (queue_.empty()) std::rethrow_exception(error_);
  batch item = std::move(queue_.front());
  queue_.pop_front();
  if (out.images.size() > 0) spare_.push_back(std::move(out));
  out = std::move(item);
  ++consumed_;
  lock.unlock();
  space_.notify_all();
  return true;
}

}  // namespace ringflow::data
