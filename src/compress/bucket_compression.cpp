// bucket_compression: per-bucket compressors and residuals for a trainer.
#include "ringflow/compress/bucket_compression.hpp"

#include <fmt/format.h>

#include <algorithm>

#include "ringflow/coll/collectives.hpp"
#include "ringflow/core/error.hpp"

namespace ringflow::compress {

bucket_compression::bucket_compression(std::string spec, bucket_compression_options opts)
    : spec_(std::move(spec)), opts_(std::move(opts)) {
  if (spec_ == "auto") {
    for (const auto& c : opts_.auto_candidates) make_compressor(c);  // validate early
  } else {
    make_compressor(spec_, opts_.seed);  // throws usage_error on a bad spec, before training
  }
}

std::string bucket_compression::spec_of(std::size_t bucket_index) const {
  if (bucket_index >= slots_.size() || !slots_[bucket_index].c) return "";
  return slots_[bucket_index].c->name();
}

bucket_compression::slot& bucket_compression::slot_for(const communicator& comm,
                                                       std::size_t bucket_index, std::size_t n) {
  if (bucket_index >= slots_.size()) slots_.resize(bucket_index + 1);
  slot& s = slots_[bucket_index];
  if (s.c) return s;
  std::string use = spec_;
  if (spec_ == "auto") {
    // Rank 0 decides, everyone follows: codec timings differ between ranks,
    // and different compressors on different ranks would mismatch collectives.
    std::int32_t pick = -1;  // -1: none, else an index into auto_candidates
    if (comm.rank() == 0) {
      if (!policy_) {
        policy_ = std::make_unique<auto_policy>(opts_.link ? *opts_.link : link_model::for_this_machine(),
                                                comm.size(), opts_.auto_candidates);
        policy_->calibrate(std::min<std::size_t>(n, std::size_t{1} << 20));
      }
      const std::string c = policy_->choose(n);
      const auto& cand = opts_.auto_candidates;
      const auto it = std::find(cand.begin(), cand.end(), c);
      if (it != cand.end()) pick = static_cast<std::int32_t>(it - cand.begin());
    }
    broadcast(comm, std::span<std::int32_t>(&pick, 1), 0);
    use = pick < 0 ? "none" : opts_.auto_candidates[static_cast<std::size_t>(pick)];
  }
  // Every bucket gets its own seed stream: same spec, different random numbers.
  s.c = make_compressor(use, opts_.seed + 0x9e3779b97f4a7c15ull * (bucket_index + 1));
  s.ef = opts_.error_feedback.value_or(s.c->wants_error_feedback());
  if (s.layout) s.c->set_layout(*s.layout);
  return s;
}

void bucket_compression::set_layout(std::size_t bucket_index, bucket_layout layout) {
  layout.validate();
  if (bucket_index >= slots_.size()) slots_.resize(bucket_index + 1);
  slot& s = slots_[bucket_index];
  if (s.c) s.c->set_layout(layout);
  s.layout = std::move(layout);
}

traffic bucket_compression::reduce(const communicator& comm, std::span<float> grads,
                                   std::size_t bucket_index) {
  if (grads.empty()) return {};  // nothing to send; keeps empty buckets harmless
  slot& s = slot_for(comm, bucket_index, grads.size());
  traffic t;
  if (auto* plain = dynamic_cast<none_compressor*>(s.c.get()); plain != nullptr && !s.ef) {
    plain->average(comm, grads, opts_.plain_coll, t);
  } else {
    t = compressed_allreduce(comm, grads, *s.c, bucket_index, s.ef ? &ef_ : nullptr);
  }
  total_ += t;
  return t;
}

}  // namespace ringflow::compress
