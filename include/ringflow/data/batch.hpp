// Batch assembly and a background prefetcher that builds the next batches while a step runs.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <exception>
#include <mutex>
#include <span>
#include <thread>
#include <vector>

#include "ringflow/data/dataset.hpp"

namespace ringflow::data {

/// One mini-batch: images is a contiguous row-major [size(), features]
/// float block (images.data() can be handed to a GEMM as is), labels [size()].
struct batch {
  float_matrix images;
  std::vector<std::int32_t> labels;

  std::size_t size() const { return labels.size(); }
};

/// Copies the samples `indices` of `ds` into `out`, reusing its storage
/// when the shape already fits. Throws usage_error on an index >= ds.size().
void assemble_batch(const dataset& ds, std::span<const std::size_t> indices, batch& out);
/// As above, returning a new batch.
batch assemble_batch(const dataset& ds, std::span<const std::size_t> indices);

/// Number of batches a list of `count` indices makes: ceil(count /
/// batch_size), or floor when `drop_last`. Throws usage_error when
/// batch_size is 0.
std::size_t batch_count(std::size_t count, std::size_t batch_size, bool drop_last = false);

/// Options of a prefetcher.
struct prefetch_options {
  /// Batches assembled ahead of the consumer (bounded queue length).
  /// 0 assembles each batch on the calling thread inside next(): no thread.
  std::size_t depth = 2;
  /// Drop a final batch smaller than batch_size.
  bool drop_last = false;
};

/// Walks `indices` in batches of `batch_size`, assembling up to
/// options.depth batches ahead on a background std::thread. The batches are
/// identical to assemble_batch() over consecutive slices of `indices`, with
/// or without the thread. An exception on the worker is rethrown by the
/// next() that would have returned the failed batch. The destructor stops
/// and joins the worker and never throws; a consumer that stops early is
/// fine. `ds` must outlive the prefetcher.
/// @code
///   ringflow::data::prefetcher p(train, sampler.remaining(), 128);
///   ringflow::data::batch b;
///   while (p.next(b)) { step(b.images, b.labels); }
/// @endcode
class prefetcher {
 public:
  prefetcher(const dataset& ds, std::span<const std::size_t> indices, std::size_t batch_size,
             prefetch_options options = {});
  ~prefetcher();
  prefetcher(const prefetcher&) = delete;
  prefetcher& operator=(const prefetcher&) = delete;

  /// Moves the next batch into `out` and returns true, or returns false
  /// after the last one. The storage `out` held is recycled for a later
  /// batch, so a loop reusing one `batch` allocates nothing in steady state.
  bool next(batch& out);

  /// Total number of batches this prefetcher yields.
  std::size_t size() const { return num_batches_; }

 private:
  std::span<const std::size_t> slice(std::size_t b) const;
  void run_worker();

  const dataset& dataset_;
  std::vector<std::size_t> indices_;
  std::size_t batch_size_;
  std::size_t depth_;
  std::size_t num_batches_;
  std::size_t consumed_ = 0;

  std::mutex mutex_;
  std::condition_variable ready_;  // consumer waits: a batch, an error or the end
  std::condition_variable space_;  // worker waits: room in the queue or stop
  std::deque<batch> queue_;
  std::vector<batch> spare_;  // storage returned by the consumer
  std::exception_ptr error_;
  bool stop_ = false;
  std::thread worker_;
};

}  // namespace ringflow::data
