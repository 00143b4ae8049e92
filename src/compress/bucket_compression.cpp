// bucket_compression: per-bucket compressors and residuals for a trainer.
#include "ringflow/compress/bucket_compression.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <set>

#include "ringflow/coll/collectives.hpp"
#include "ringflow/core/error.hpp"

namespace ringflow::compress {

namespace {
std::uint64_t seed_of(std::uint64_t seed, std::size_t bucket_index) {
  // Every bucket gets its own seed stream: same spec, different random numbers.
  return seed + 0x9e3779b97f4a7c15ull * (bucket_index + 1);
}
}  // namespace

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
        policy_ =
            std::make_unique<auto_policy>(opts_.link ? *opts_.link : link_model::for_this_machine(),
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
  s.c = make_compressor(use, seed_of(opts_.seed, bucket_index));
  s.ef = opts_.error_feedback.value_or(s.c->wants_error_feedback());
  if (s.layout) s.c->set_layout(*s.layout);
  return s;
}

std::vector<bucket_state> bucket_compression::state() const {
  std::vector<bucket_state> out;
  for (std::size_t i = 0; i < slots_.size(); ++i) {
    const slot& s = slots_[i];
    if (!s.c) continue;
    bucket_state b{i, s.c->name(), s.ef, {}, s.c->state()};
    const auto r = ef_.find(i);
    b.residual.assign(r.begin(), r.end());
    out.push_back(std::move(b));
  }
  return out;
}

// A compressor for saved bucket `b`, validated against this spec and the
// bucket's layout, holding b's counters and warm starts.
std::unique_ptr<compressor> bucket_compression::restored(const bucket_state& b) const {
  const std::string where = fmt::format("bucket {}", b.bucket);
  bool allowed = false;
  if (spec_ == "auto") {
    allowed = b.spec == "none";
    for (const auto& c : opts_.auto_candidates)
      allowed = allowed || make_compressor(c)->name() == b.spec;
  } else {
    allowed = make_compressor(spec_)->name() == b.spec;
  }
  if (!allowed) {
    throw usage_error(fmt::format(
        "{} was compressed with '{}', which compression '{}' does not use", where, b.spec, spec_));
  }
  std::unique_ptr<compressor> c = make_compressor(b.spec, seed_of(opts_.seed, b.bucket));
  const bool ef = opts_.error_feedback.value_or(c->wants_error_feedback());
  if (ef != b.error_feedback) {
    throw usage_error(
        fmt::format("{} was compressed {} error feedback, this trainer runs '{}' {} it", where,
                    b.error_feedback ? "with" : "without", b.spec, ef ? "with" : "without"));
  }
  const std::optional<bucket_layout>* layout =
      b.bucket < slots_.size() ? &slots_[b.bucket].layout : nullptr;
  // Without layouts any index is possible, but not a corrupt one's size.
  constexpr std::size_t max_buckets = std::size_t{1} << 20;
  if (layout == nullptr && b.bucket >= max_buckets) {
    throw usage_error(
        fmt::format("{} is not a plausible bucket index (at most {} buckets)", where, max_buckets));
  }
  if (layout == nullptr && !slots_.empty()) {
    throw usage_error(
        fmt::format("{} does not exist here: this trainer has {} buckets (another "
                    "bucket cap?)",
                    where, slots_.size()));
  }
  if (layout != nullptr && layout->has_value()) {
    if (ef && b.residual.size() != (*layout)->size) {
      throw usage_error(
          fmt::format("{}'s residual has {} elements, the bucket {} (another model "
                      "or bucket cap?)",
                      where, b.residual.size(), (*layout)->size));
    }
    c->set_layout(**layout);
  }
  if (!ef && !b.residual.empty()) {
    throw usage_error(fmt::format("{} has a residual of {} elements but no error feedback", where,
                                  b.residual.size()));
  }
  if (ef && b.residual.empty()) {
    throw usage_error(fmt::format("{} has error feedback but no residual", where));
  }
  c->load_state(b.codec);
  return c;
}

void bucket_compression::check_state(const std::vector<bucket_state>& s) const {
  std::set<std::size_t> seen;
  for (const bucket_state& b : s) {
    if (!seen.insert(b.bucket).second) {
      throw usage_error(fmt::format("bucket {} appears twice in the compression state", b.bucket));
    }
    (void)restored(b);
  }
}

void bucket_compression::load_state(const std::vector<bucket_state>& s) {
  check_state(s);
  std::vector<std::unique_ptr<compressor>> made;
  made.reserve(s.size());
  for (const bucket_state& b : s) made.push_back(restored(b));
  // Nothing below throws but allocation: every bucket starts afresh, then
  // the saved ones take their state.
  for (std::size_t i = 0; i < slots_.size(); ++i) {
    slots_[i].c.reset();
    ef_.set(i, {});
  }
  for (std::size_t k = 0; k < s.size(); ++k) {
    const bucket_state& b = s[k];
    if (b.bucket >= slots_.size()) slots_.resize(b.bucket + 1);
    slot& sl = slots_[b.bucket];
    sl.c = std::move(made[k]);
    sl.ef = b.error_feedback;
    ef_.set(b.bucket, b.residual);
  }
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
