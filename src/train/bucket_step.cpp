// The bookkeeping both bucketed trainers share (bucket_step.hpp).
#include "bucket_step.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <array>

#include "ringflow/coll/collectives.hpp"
#include "ringflow/core/error.hpp"
#include "ringflow/core/log.hpp"

namespace ringflow::train::detail {

double busy_seconds(std::span<const span_record> records) {
  double s = 0;
  for (const auto& r : records) s += (r.end_us - r.start_us) * 1e-6;
  return s;
}

void step_tracker::plan(const std::vector<bucket>& buckets,
                        const ad::parameter_store<float>& params, int r) {
  rank = r;
  bucket_of.assign(params.size(), 0);
  expected.assign(params.size(), false);
  expected_in.assign(buckets.size(), 0);
  for (std::size_t b = 0; b < buckets.size(); ++b) {
    for (const std::size_t i : buckets[b].params) {
      bucket_of[i] = b;
      expected[i] = params[i].tensor.requires_grad();
      if (expected[i]) ++expected_in[b];
    }
  }
  fired.assign(params.size(), 0);
}

void step_tracker::reset() {
  std::fill(fired.begin(), fired.end(), 0u);
  accumulated.assign(fired.size(), false);
  accumulated_backwards = 0;
  pending = expected_in;
  next = 0;
  flag_launched = false;
}

bool step_tracker::count_ready(std::size_t i, const ad::parameter_store<float>& params) {
  if (!expected[i]) {
    throw usage_error(fmt::format(
        "{} on rank {}: parameter '{}' did not require a gradient when the trainer was built; "
        "rebuild it after changing requires_grad",
        who, rank, params[i].name));
  }
  if (no_sync) {  // accumulation: the gradient keeps adding up in the buffer
    accumulated[i] = true;
    return false;
  }
  if (++fired[i] > 1) {
    throw usage_error(fmt::format(
        "{} on rank {}: parameter '{}' reported its gradient twice in step {}; call finish() (or "
        "step()) once after each backward, or run the earlier backwards inside no_sync() to "
        "accumulate",
        who, rank, params[i].name, step));
  }
  return true;
}

void step_tracker::zero_missing(const bucket& bk, const ad::parameter_store<float>& params,
                                std::span<float> grads, std::size_t base) const {
  for (const std::size_t i : bk.params) {
    if (expected[i] && fired[i] == 0 && !accumulated[i]) {
      const auto& p = params[i];
      std::fill_n(grads.begin() + static_cast<std::ptrdiff_t>(p.offset - base), p.size, 0.0f);
    }
  }
}

bool step_tracker::started() const {
  return flag_launched || next > 0 ||
         std::any_of(fired.begin(), fired.end(), [](auto n) { return n > 0; }) ||
         std::find(accumulated.begin(), accumulated.end(), true) != accumulated.end();
}

void step_tracker::launch_flag(const communicator& comm) {
  flag_launched = true;
  const std::int32_t mine = contribution;
  std::int32_t* out = &contributors;
  flag_handle = ext::enqueue(comm, [mine, out](const communicator& c) {
    std::int32_t n = mine;
    allreduce(c, std::span<std::int32_t>(&n, 1), sum, coll_options{algo::ring, 0});
    *out = n;
  });
}

bool step_tracker::join_round(const communicator& comm, bool uneven_inputs,
                              std::string_view options_name) {
  if (!uneven_inputs) {
    throw usage_error(fmt::format(
        "{} on rank {}: join() needs {}::uneven_inputs = true on every rank (the ranks still "
        "training must send their count each step)",
        who, rank, options_name));
  }
  if (no_sync) {
    throw usage_error(
        fmt::format("{} on rank {}: join() inside a no_sync() scope; end the scope and finish the "
                    "accumulated step first",
                    who, rank));
  }
  if (started()) {
    throw usage_error(
        fmt::format("{} on rank {}: join() in the middle of step {} (a backward ran since the last "
                    "finish()); call finish() or step() first",
                    who, rank, step));
  }
  contribution = 0;
  launch_flag(comm);
  flag_handle.wait();
  if (contributors == 0) {  // every rank has joined: the uneven epoch is over
    contribution = 1;
    flag_launched = false;
    return false;
  }
  return true;
}

std::exception_ptr step_tracker::wait_step(
    std::initializer_list<std::span<collective_handle>> handles) {
  std::exception_ptr failure;
  try {
    if (flag_launched) flag_handle.wait();
  } catch (...) {
    failure = std::current_exception();
  }
  for (const auto& hs : handles) {
    try {
      wait_all(hs);
    } catch (...) {
      if (!failure) failure = std::current_exception();
    }
  }
  return failure;
}

void step_tracker::wait_quietly(
    std::initializer_list<std::span<collective_handle>> handles) noexcept {
  try {
    flag_handle.wait();
  } catch (const std::exception& e) {
    log::error("{} on rank {}: the contributing-ranks count failed: {}", who, rank, e.what());
  }
  for (const auto& hs : handles) {
    for (auto& h : hs) {
      try {
        h.wait();
      } catch (const std::exception& e) {
        log::error("{} on rank {}: a bucket collective failed: {}", who, rank, e.what());
      }
    }
  }
}

std::uint64_t layout_hash(const ad::parameter_store<float>& params) {
  std::uint64_t h = 0xcbf29ce484222325ull;
  const auto mix = [&](const void* data, std::size_t n) {
    const auto* b = static_cast<const unsigned char*>(data);
    for (std::size_t i = 0; i < n; ++i) {
      h ^= b[i];
      h *= 0x100000001b3ull;
    }
  };
  for (const auto& p : params) {
    mix(p.name.data(), p.name.size() + 1);
    const std::uint64_t size = p.size;
    mix(&size, sizeof size);
  }
  return h;
}

void check_same_model(const communicator& comm, const ad::parameter_store<float>& params,
                      std::uint64_t h, std::string_view who) {
  // max over {h, ~h} gives the max and (negated) min hash.
  std::array<std::int64_t, 2> hm{static_cast<std::int64_t>(h), ~static_cast<std::int64_t>(h)};
  allreduce_async(comm, std::span<std::int64_t>(hm), max).wait();
  if (static_cast<std::uint64_t>(hm[0]) != h || static_cast<std::uint64_t>(~hm[1]) != h) {
    throw usage_error(
        fmt::format("{} on rank {}: the ranks built different models (this rank: {} parameters, {} "
                    "elements, layout hash {:016x}); build the same model on every rank",
                    who, comm.rank(), params.size(), params.numel(), h));
  }
}

}  // namespace ringflow::train::detail
