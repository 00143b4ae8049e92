// Alpha-beta predictions for plain vs compressed allreduce, codec timing,
// and the per-bucket `auto` policy.
#include "ringflow/compress/decide.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <ctime>
#include <limits>
#include <string_view>

#include "ringflow/compress/kernels.hpp"
#include "ringflow/core/env.hpp"
#include "ringflow/core/error.hpp"

namespace ringflow::compress {

namespace {
double env_or(const char* name, double fallback) {
  return env::real(name, fallback, {.lo = 0, .hi = 1e12, .lo_open = true}, env::malformed::fail);
}

// CPU time of the calling thread: on a shared, oversubscribed machine this
// measures the codec's work rather than the scheduler's mood.
double thread_seconds() {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}
}  // namespace

link_model link_model::from_gbps(double gbps, double alpha_us) {
  if (!(gbps > 0)) throw usage_error(fmt::format("link model: gbps must be > 0, got {}", gbps));
  if (!(alpha_us >= 0)) {
    throw usage_error(fmt::format("link model: alpha_us must be >= 0, got {}", alpha_us));
  }
  return {alpha_us * 1e-6, 8.0 / (gbps * 1e9)};
}

link_model link_model::from_env() {
  return from_gbps(env_or("RINGFLOW_LINK_GBPS", 10.0), env_or("RINGFLOW_LINK_ALPHA_US", 20.0));
}

link_model link_model::from_cost_model(const cost_model& m) {
  return {m.inter.alpha, m.inter.beta};
}

link_model link_model::for_this_machine() {
  if (env::is_set("RINGFLOW_LINK_GBPS")) return from_env();
  return from_cost_model(local_cost_model());
}

double predict_round(const link_model& link, const wire_round& round, int ranks) {
  if (ranks <= 1) return 0.0;
  const double p = ranks;
  const auto b = static_cast<double>(round.bytes);
  if (round.kind == combine::sum) {
    return 2 * (p - 1) * link.alpha_s + 2 * (p - 1) / p * b * link.beta_s_per_byte;
  }
  return (p - 1) * link.alpha_s + (p - 1) * b * link.beta_s_per_byte;
}

codec_speed measure_codec(compressor& c, std::size_t n, int reps) {
  if (n == 0) throw usage_error("measure_codec: n must be >= 1");
  std::vector<float> x(n), out(n, 0.0f);
  const std::uint64_t key = kernels::stream_key(42, 0, 0);
  for (std::size_t i = 0; i < n; ++i) x[i] = kernels::uniform01(key, i) * 2.0f - 1.0f;
  std::vector<std::byte> payload(c.payload_bytes(n));
  std::vector<double> enc, dec;
  for (int rep = 0; rep <= std::max(1, reps); ++rep) {
    const double t0 = thread_seconds();
    c.encode(x, payload, 0);
    const double t1 = thread_seconds();
    c.decode_add(payload, out);
    const double t2 = thread_seconds();
    if (rep == 0) continue;  // warm-up: page faults, caches
    enc.push_back(std::max(t1 - t0, 1e-9));
    dec.push_back(std::max(t2 - t1, 1e-9));
  }
  const double bytes = 4.0 * static_cast<double>(n);
  return {bytes / median(enc) / 1e9, bytes / median(dec) / 1e9};
}

prediction predict(const compressor& c, std::size_t n, int ranks, const link_model& link,
                   const codec_speed& speed) {
  prediction out;
  out.plain_s = predict_round(link, wire_round{combine::sum, 4 * n, 4}, ranks);
  for (const wire_round& w : c.wire_plan(n, ranks)) out.wire_s += predict_round(link, w, ranks);
  if (c.name() != "none") {
    const double bytes = 4.0 * static_cast<double>(n);
    const double decodes = c.how() == combine::gather ? std::max(ranks, 1) : 1;
    if (speed.encode_gbps > 0) out.codec_s += bytes / (speed.encode_gbps * 1e9);
    if (speed.decode_gbps > 0) out.codec_s += decodes * bytes / (speed.decode_gbps * 1e9);
  }
  return out;
}

double break_even_gbps(const compressor& c, std::size_t n, int ranks, double alpha_s,
                       const codec_speed& speed, double margin) {
  if (!(margin >= 0 && margin < 1)) {
    throw usage_error(fmt::format("break_even_gbps: margin must be in [0, 1), got {}", margin));
  }
  if (ranks <= 1 || n == 0) return 0.0;  // nothing on the wire: nothing to win
  // predict() at beta = 0 gives the alpha terms (A) and the codec time; at
  // beta = 1 s/byte it adds the byte terms (B).
  const link_model a_only{alpha_s, 0.0}, unit{alpha_s, 1.0};
  const prediction p0 = predict(c, n, ranks, a_only, speed);
  const prediction p1 = predict(c, n, ranks, unit, speed);
  const double keep = 1.0 - margin;
  const double bytes_gain = keep * p1.plain_s - p1.wire_s - (keep * p0.plain_s - p0.wire_s);
  const double fixed_cost = p0.compressed_s() - keep * p0.plain_s;
  if (bytes_gain <= 0) return 0.0;
  if (fixed_cost <= 0) return std::numeric_limits<double>::infinity();
  return bytes_gain / fixed_cost / 1e9;  // 1 / beta*, bytes per second -> GB/s
}

auto_policy::auto_policy(link_model link, int ranks, std::vector<std::string> candidates,
                         double margin)
    : link_(link), ranks_(ranks), candidates_(std::move(candidates)), margin_(margin) {
  if (ranks < 1) throw usage_error(fmt::format("auto_policy: ranks must be >= 1, got {}", ranks));
  if (!(margin >= 0 && margin < 1)) {
    throw usage_error(fmt::format("auto_policy: margin must be in [0, 1), got {}", margin));
  }
  for (const std::string& spec : candidates_) probes_[spec] = make_compressor(spec);
}

void auto_policy::calibrate(std::size_t n) {
  for (const std::string& spec : candidates_) {
    auto c = make_compressor(spec);
    speed_[spec] = measure_codec(*c, n);
  }
}

std::map<std::string, prediction> auto_policy::predictions(std::size_t n) const {
  std::map<std::string, prediction> out;
  for (const std::string& spec : candidates_) {
    auto it = speed_.find(spec);
    if (it == speed_.end()) {
      throw usage_error(fmt::format(
          "auto_policy: no codec speed for '{}'; call calibrate() or set_speed() first", spec));
    }
    out[spec] = predict(*probes_.at(spec), n, ranks_, link_, it->second);
  }
  return out;
}

std::map<std::string, double> auto_policy::break_even(std::size_t n) const {
  std::map<std::string, double> out;
  for (const std::string& spec : candidates_) {
    auto it = speed_.find(spec);
    if (it == speed_.end()) {
      throw usage_error(fmt::format(
          "auto_policy: no codec speed for '{}'; call calibrate() or set_speed() first", spec));
    }
    out[spec] = break_even_gbps(*probes_.at(spec), n, ranks_, link_.alpha_s, it->second, margin_);
  }
  return out;
}

std::string auto_policy::choose(std::size_t n) const {
  if (n == 0 || ranks_ == 1) return "none";
  std::string best = "none";
  double best_s = 0;
  for (const auto& [spec, pr] : predictions(n)) {
    if (pr.compressed_s() < (1.0 - margin_) * pr.plain_s &&
        (best == "none" || pr.compressed_s() < best_s)) {
      best = spec;
      best_s = pr.compressed_s();
    }
  }
  return best;
}

}  // namespace ringflow::compress
