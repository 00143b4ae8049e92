// The alpha-beta-gamma model: per-algorithm formulas, the choice, the file.
#include "ringflow/coll/cost_model.hpp"

#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <optional>
#include <sstream>

#include "core/json.hpp"
#include "ringflow/coll/algorithms.hpp"
#include "ringflow/coll/alltoall.hpp"
#include "ringflow/coll/fold.hpp"
#include "ringflow/coll/registry.hpp"
#include "ringflow/core/atomic_file.hpp"
#include "ringflow/core/env.hpp"
#include "ringflow/core/error.hpp"
#include "ringflow/core/log.hpp"

namespace ringflow {

cost_model builtin_cost_model() {
  // Measured with `mpirun -np 2 ringflow-bench --calibrate` on the
  // development machine (2 cores, OpenMPI 4.1 shared memory); see
  // docs/collectives.md. One machine, so inter == intra.
  cost_model m;
  m.intra = {0.58e-6, 0.079e-9, 3.4e-6, 4096};
  m.inter = m.intra;
  m.gamma = 0.031e-9;
  // -np 4 on the 2 cores: a 1 KiB recursive doubling (2 steps) takes
  // ~20 us against ~1.4 us at -np 2, so each step in which all four ranks
  // must run waits ~10 us for a descheduled peer (docs/collectives.md).
  m.oversubscribed_step = 10e-6;
  m.origin = "built-in";
  m.machine = "ringflow development machine (2 cores, shared memory)";
  return m;
}

namespace {

double log2i(int q) { return std::log2(static_cast<double>(q)); }

std::size_t seg_count(double bytes, std::size_t seg) {
  if (bytes <= 0) return 1;
  return std::max<std::size_t>(
      1, static_cast<std::size_t>(std::ceil(bytes / static_cast<double>(seg))));
}

// Ring over p ranks on links `l`: 2(p-1) steps of n/p bytes, each cut into
// segments of `seg` bytes (one message each).
double ring_time(const link_cost& l, double gamma, int p, double n, std::size_t seg) {
  if (p <= 1) return 0;
  const double steps = 2.0 * (p - 1);
  const double k = static_cast<double>(seg_count(n / p, seg));
  // k messages of (n/p)/k bytes per step. The ring reduces segment j while
  // segment j+1 is in flight, so only one segment's reduction per step is
  // exposed (all of it when a chunk is a single segment).
  return steps * k * l.message(n / p / k) + (p - 1.0) / p * n * gamma / k;
}

// The fold of a non-power-of-two count: the whole buffer in and out once.
double fold_time(const link_cost& l, double gamma, int p, double n) {
  if (detail::pow2_floor(p) == p) return 0;
  return 2 * l.message(n) + n * gamma;
}

}  // namespace

double oversubscription(const cluster_shape& s) {
  if (s.cores_per_node <= 0 || s.ranks_per_node <= s.cores_per_node) return 0;
  return static_cast<double>(s.ranks_per_node) / s.cores_per_node - 1;
}

namespace {
// What every formula starts from: the link a flat algorithm crosses (the
// inter-node one when there are several nodes: it crosses node boundaries
// in every step that matters), and the oversubscription penalty: with more
// ranks than cores on a node every step that needs all of them running
// waits for descheduled ones (pen per such step).
struct model_terms {
  const link_cost& l;
  double g, n, over, pen;
  int p, folds;
};
model_terms terms_of(const cost_model& m, const cluster_shape& s, std::size_t bytes) {
  const double over = oversubscription(s);
  return {s.nodes > 1 ? m.inter : m.intra,
          m.gamma,
          static_cast<double>(bytes),
          over,
          m.oversubscribed_step * over,
          s.ranks,
          detail::pow2_floor(s.ranks) == s.ranks ? 0 : 2};
}
}  // namespace

namespace detail {

double ring_cost(const cost_model& m, const cluster_shape& s, std::size_t bytes,
                 std::size_t segment_bytes) {
  const model_terms t = terms_of(m, s, bytes);
  return ring_time(t.l, t.g, t.p, t.n, segment_bytes ? segment_bytes : default_segment_bytes) +
         2.0 * (t.p - 1) * t.pen;
}

double recursive_doubling_cost(const cost_model& m, const cluster_shape& s, std::size_t bytes,
                               std::size_t /*segment_bytes*/) {
  const model_terms t = terms_of(m, s, bytes);
  // Only while the whole buffer goes as one small (eager) message: past
  // the rendezvous switch, measured whole-buffer exchanges cost far more
  // than the linear model says (docs/collectives.md), and
  // halving-doubling moves half the bytes per round anyway.
  if (t.l.large_from > 0 && t.n >= t.l.large_from) return -1;
  const int q = detail::pow2_floor(t.p);
  return log2i(q) * (t.l.message(t.n) + t.n * t.g) + fold_time(t.l, t.g, t.p, t.n) +
         (log2i(q) + t.folds) * t.pen;
}

double halving_doubling_cost(const cost_model& m, const cluster_shape& s, std::size_t bytes,
                             std::size_t /*segment_bytes*/) {
  const model_terms t = terms_of(m, s, bytes);
  // Round k moves n/2^k bytes each way, in both phases.
  const int q = detail::pow2_floor(t.p);
  double time = fold_time(t.l, t.g, t.p, t.n) + (2 * log2i(q) + t.folds) * t.pen;
  for (int w = 2; w <= q; w *= 2) time += 2 * t.l.message(t.n / w) + t.n / w * t.g;
  return time;
}

namespace {
// Pipelined: (depth + segments - 1) steps; in a step an interior rank takes
// a segment from each of its c children and reduces it, and hands the
// result to c children on the way down. In the double tree each half has
// half the segments and a rank is interior in one tree and a leaf (one send
// up, one receive down) in the other.
double tree_cost_of(int trees, const cost_model& m, const cluster_shape& s, std::size_t bytes,
                    std::size_t segment_bytes) {
  const model_terms t = terms_of(m, s, bytes);
  const std::size_t seg = segment_bytes ? segment_bytes : default_tree_segment_bytes;
  const int depth = static_cast<int>(std::floor(std::log2(static_cast<double>(t.p))));
  const double c = std::min(2, t.p - 1);
  const double sb = std::min(t.n, static_cast<double>(seg));
  const double interior = c * (2 * t.l.message(sb) + sb * t.g);
  if (trees == 1) {
    const double k = static_cast<double>(seg_count(t.n, seg));
    // With one segment a step only needs a parent and its children
    // running; once the pipeline fills, every rank.
    double tree_pen = t.pen;
    if (k == 1 && t.over > 0) {
      const double active = std::min(s.ranks_per_node, 3);
      tree_pen = m.oversubscribed_step * std::max(0.0, active / s.cores_per_node - 1);
    }
    return (depth + k - 1) * (interior + 2 * tree_pen);
  }
  const double sh = std::min(t.n / 2, static_cast<double>(seg));
  const double k = static_cast<double>(seg_count(t.n / 2, seg));
  const double step = c * (2 * t.l.message(sh) + sh * t.g) + 2 * t.l.message(sh);
  return (depth + 1 + k - 1) * (step + 2 * t.pen);
}
}  // namespace

double tree_cost(const cost_model& m, const cluster_shape& s, std::size_t bytes,
                 std::size_t segment_bytes) {
  return tree_cost_of(1, m, s, bytes, segment_bytes);
}

double double_tree_cost(const cost_model& m, const cluster_shape& s, std::size_t bytes,
                        std::size_t segment_bytes) {
  return tree_cost_of(2, m, s, bytes, segment_bytes);
}

double hierarchical_cost(const cost_model& m, const cluster_shape& s, std::size_t bytes,
                         std::size_t segment_bytes) {
  if (s.nodes <= 1 || s.ranks_per_node <= 1) return -1;
  const model_terms t = terms_of(m, s, bytes);
  const int L = s.ranks_per_node;
  const double piece = t.n / L;
  const double intra = 2 * (L - 1) * m.intra.message(piece) + (L - 1) * piece * t.g;
  return intra + 2 * t.pen +
         ring_time(m.inter, t.g, s.nodes, piece,
                   segment_bytes ? segment_bytes : default_segment_bytes) +
         2.0 * (s.nodes - 1) * t.pen;
}

}  // namespace detail

double predict_seconds(algo a, const cost_model& m, const cluster_shape& s, std::size_t bytes,
                       std::size_t segment_bytes) {
  if (s.ranks <= 1) return 0;
  const algorithm_info& info = algorithm_info_of(a);
  if (info.cost != nullptr) return info.cost(m, s, bytes, segment_bytes);
  // Provided by a backend (algo::shm: backends/shm), which registers its cost.
  const auto cost = ext::registered_cost(a);
  return cost != nullptr ? cost(m, s, bytes) : -1;
}

double predict_alltoall_seconds(alltoall_algo a, const cost_model& m, const cluster_shape& s,
                                std::size_t bytes) {
  const int p = s.ranks;
  if (p <= 1) return 0;
  const double n = static_cast<double>(bytes);
  const double block = n / p;
  const link_cost& l = s.nodes > 1 ? m.inter : m.intra;
  const double pen = m.oversubscribed_step * oversubscription(s);
  switch (a) {
    case alltoall_algo::pairwise: {
      // p-1 messages of n/p bytes; alltoall_window steps are in flight at
      // once, so a descheduled peer costs once per window, not per step.
      const double windows = std::ceil((p - 1.0) / detail::alltoall_window);
      return (p - 1) * l.message(block) + windows * pen;
    }
    case alltoall_algo::bruck: {
      // Round k sends the blocks whose position has bit k set, packed; every
      // byte of a round is packed and unpacked (charged gamma per byte, a
      // streaming pass like a reduction's), and the input and output are
      // rotated once each.
      double t = 2 * n * m.gamma;
      for (int k = 1; k < p; k <<= 1) {
        int blocks = 0;
        for (int i = 1; i < p; ++i) blocks += (i & k) ? 1 : 0;
        const double moved = blocks * block;
        t += l.message(moved) + 2 * moved * m.gamma + pen;
      }
      return t;
    }
    case alltoall_algo::automatic: break;
  }
  return -1;
}

alltoall_algo choose_alltoall(const cost_model& m, const cluster_shape& s, std::size_t bytes) {
  const double pw = predict_alltoall_seconds(alltoall_algo::pairwise, m, s, bytes);
  const double br = predict_alltoall_seconds(alltoall_algo::bruck, m, s, bytes);
  return br < pw ? alltoall_algo::bruck : alltoall_algo::pairwise;
}

double predict_reduce_seconds(algo a, const cost_model& m, const cluster_shape& s,
                              std::size_t bytes, std::size_t segment_bytes) {
  const int p = s.ranks;
  if (p <= 1) return 0;
  const double n = static_cast<double>(bytes);
  const link_cost& l = s.nodes > 1 ? m.inter : m.intra;
  const double pen = m.oversubscribed_step * oversubscription(s);
  switch (a) {
    case algo::tree: {
      // ceil(log2 p) rounds on the root's path, each a whole-buffer message
      // and its reduction.
      const double rounds = std::ceil(log2i(p));
      return rounds * (l.message(n) + n * m.gamma + pen);
    }
    case algo::ring: {
      // The ring's reduce-scatter half (p-1 steps), then the root receives
      // p-1 pieces of n/p.
      const std::size_t seg = segment_bytes ? segment_bytes : default_segment_bytes;
      const double k = static_cast<double>(seg_count(n / p, seg));
      return (p - 1) * (k * l.message(n / p / k) + pen) + (p - 1.0) / p * n * m.gamma / k +
             (p - 1) * l.message(n / p) + pen;
    }
    default: return -1;
  }
}

algo choose_reduce(const cost_model& m, const cluster_shape& s, std::size_t bytes) {
  const double tree = predict_reduce_seconds(algo::tree, m, s, bytes);
  const double ring = predict_reduce_seconds(algo::ring, m, s, bytes);
  return ring < tree ? algo::ring : algo::tree;
}

// The candidates are the table's rows algo::automatic may pick, in its
// order: on a tie the earlier wins (halving-doubling before the ring, which
// it equals on two ranks, same messages, at a lower fixed cost per call).
algo fastest_algorithm(const cost_model& m, const cluster_shape& shape, std::size_t bytes) {
  algo best = algo::ring;
  double best_s = -1;
  for (const algorithm_info& info : allreduce_algorithms()) {
    if (!info.automatic) continue;
    const algo a = info.id;
    const double t = predict_seconds(a, m, shape, bytes);
    if (t >= 0 && (best_s < 0 || t < best_s)) best = a, best_s = t;
  }
  return best;
}

explanation choose_algorithm(const cost_model& m, const cluster_shape& shape, std::size_t bytes) {
  explanation e;
  e.bytes = bytes;
  e.shape = shape;
  e.model_origin = m.origin;
  for (const algorithm_info& info : allreduce_algorithms()) {
    if (!info.automatic) continue;
    const double t = predict_seconds(info.id, m, shape, bytes);
    if (t >= 0) e.candidates.push_back({info.id, t});
  }
  // Stable: on a tie the earlier (simpler) algorithm wins, on every rank.
  std::stable_sort(
      e.candidates.begin(), e.candidates.end(),
      [](const algo_prediction& x, const algo_prediction& y) { return x.seconds < y.seconds; });
  e.choice = e.candidates.front().algorithm;
  e.predicted_s = e.candidates.front().seconds;
  const auto& second = e.candidates.size() > 1 ? e.candidates[1] : e.candidates[0];
  e.runner_up = second.algorithm;
  e.runner_up_s = second.seconds;
  return e;
}

std::string explanation::to_string() const {
  std::string s = fmt::format(
      "allreduce of {} bytes on {} rank{} ({} node{} x {}): {} predicted {:.1f} us; runner-up {} "
      "{:.1f} us (model: {})",
      bytes, shape.ranks, shape.ranks == 1 ? "" : "s", shape.nodes, shape.nodes == 1 ? "" : "s",
      shape.ranks_per_node, algo_name(choice), predicted_s * 1e6, algo_name(runner_up),
      runner_up_s * 1e6, model_origin);
  if (from_table) {
    s = fmt::format(
        "allreduce of {} bytes on {} rank{} ({} node{} x {}): {} measured {:.1f} us; runner-up {} "
        "{:.1f} us (tuning table {}, tuned size {} B)",
        bytes, shape.ranks, shape.ranks == 1 ? "" : "s", shape.nodes, shape.nodes == 1 ? "" : "s",
        shape.ranks_per_node, algo_name(choice), predicted_s * 1e6, algo_name(runner_up),
        runner_up_s * 1e6, table_origin, table_rows);
  } else if (from_first_use) {
    s = fmt::format(
        "allreduce of {} bytes on {} rank{} ({} node{} x {}): {} measured {:.1f} us; runner-up {} "
        "{:.1f} us (first-use tuning: slowest rank's median of {} rounds of {} calls each)",
        bytes, shape.ranks, shape.ranks == 1 ? "" : "s", shape.nodes, shape.nodes == 1 ? "" : "s",
        shape.ranks_per_node, algo_name(choice), predicted_s * 1e6, algo_name(runner_up),
        runner_up_s * 1e6, first_use_rounds, first_use_block);
    if (first_use_kept_model) {
      s += "; kept the cost model's pick: the runner-up was faster by less than the 5% margin";
    }
  } else {
    if (!table_note.empty()) s += fmt::format("; no tuning table used: {}", table_note);
    if (!first_use_note.empty()) s += fmt::format("; {}", first_use_note);
  }
  return s;
}

// ---- the file -------------------------------------------------------------

std::string cost_model::to_json() const {
  return fmt::format(
      "{{\n"
      "  \"format\": \"ringflow-cost-model\",\n"
      "  \"version\": 1,\n"
      "  \"machine\": {},\n"
      "  \"intra_alpha_s\": {:.6e},\n"
      "  \"intra_beta_s_per_byte\": {:.6e},\n"
      "  \"intra_large_alpha_s\": {:.6e},\n"
      "  \"intra_large_from_bytes\": {:.0f},\n"
      "  \"inter_alpha_s\": {:.6e},\n"
      "  \"inter_beta_s_per_byte\": {:.6e},\n"
      "  \"inter_large_alpha_s\": {:.6e},\n"
      "  \"inter_large_from_bytes\": {:.0f},\n"
      "  \"gamma_s_per_byte\": {:.6e},\n"
      "  \"oversubscribed_step_s\": {:.6e}\n"
      "}}\n",
      detail::json::quote(machine), intra.alpha, intra.beta, intra.large_alpha, intra.large_from,
      inter.alpha, inter.beta, inter.large_alpha, inter.large_from, gamma, oversubscribed_step);
}

namespace {
// A cost model file is a few hundred bytes; anything much larger is not one.
constexpr std::size_t max_cost_model_bytes = std::size_t{1} << 20;

[[noreturn]] void cost_model_fail(std::string_view origin, std::string_view what) {
  throw usage_error(
      fmt::format("cost model {}: {}; rerun ringflow-bench --calibrate", origin, what));
}

// doc[key] as a number in [0, max]; nullopt when absent and `optional`.
std::optional<double> json_number(const detail::json::value& doc, std::string_view key,
                                  std::string_view origin, double max, bool optional = false) {
  const auto it = doc.find(key);
  if (it == doc.end()) {
    if (optional) return std::nullopt;
    cost_model_fail(origin, fmt::format("\"{}\" is missing", key));
  }
  if (!it->is_number()) {
    cost_model_fail(origin, fmt::format("\"{}\" must be a number, not {} ({})", key,
                                        detail::json::kind_name(*it), it->dump()));
  }
  const double d = it->get<double>();
  if (!std::isfinite(d) || d < 0 || d > max) {
    cost_model_fail(origin, fmt::format("\"{}\" = {} is outside [0, {}]", key, d, max));
  }
  return d;
}
}  // namespace

cost_model cost_model::from_json(std::string_view text, std::string_view origin) {
  if (text.size() > max_cost_model_bytes) {
    cost_model_fail(origin, fmt::format("{} bytes is more than the {} a cost model file may hold",
                                        text.size(), max_cost_model_bytes));
  }
  const detail::json::value doc =
      detail::json::parse(text, 4, [&](const std::string& why) { cost_model_fail(origin, why); });
  const auto format = doc.is_object() ? doc.find("format") : doc.end();
  if (!doc.is_object() || format == doc.end() || *format != "ringflow-cost-model") {
    cost_model_fail(origin, "not a ringflow cost model (no \"format\": \"ringflow-cost-model\")");
  }
  // Upper bounds: seconds per message and per byte far beyond any link, and
  // sizes within what a double holds exactly.
  constexpr double max_seconds = 10.0;
  constexpr double max_s_per_byte = 1.0;
  constexpr double max_bytes = 9007199254740992.0;  // 2^53
  cost_model m;
  m.intra.alpha = *json_number(doc, "intra_alpha_s", origin, max_seconds);
  m.intra.beta = *json_number(doc, "intra_beta_s_per_byte", origin, max_s_per_byte);
  m.inter.alpha = *json_number(doc, "inter_alpha_s", origin, max_seconds);
  m.inter.beta = *json_number(doc, "inter_beta_s_per_byte", origin, max_s_per_byte);
  // Optional (absent: one alpha for every message size).
  m.intra.large_alpha =
      json_number(doc, "intra_large_alpha_s", origin, max_seconds, true).value_or(0);
  m.intra.large_from =
      json_number(doc, "intra_large_from_bytes", origin, max_bytes, true).value_or(0);
  m.inter.large_alpha =
      json_number(doc, "inter_large_alpha_s", origin, max_seconds, true).value_or(0);
  m.inter.large_from =
      json_number(doc, "inter_large_from_bytes", origin, max_bytes, true).value_or(0);
  m.gamma = *json_number(doc, "gamma_s_per_byte", origin, max_s_per_byte);
  // Optional (absent: files from before it; the built-in value).
  m.oversubscribed_step = json_number(doc, "oversubscribed_step_s", origin, max_seconds, true)
                              .value_or(builtin_cost_model().oversubscribed_step);
  if (const auto mach = doc.find("machine"); mach != doc.end()) {
    if (!mach->is_string()) cost_model_fail(origin, "\"machine\" must be a string");
    m.machine = mach->get<std::string>();
  }
  m.origin = std::string(origin);
  return m;
}

std::string cost_model_path() {
  if (auto p = env::text("RINGFLOW_COST_MODEL")) return std::move(*p);
  return (env::cache_dir() / "cost_model.json").string();
}

cost_model local_cost_model() {
  const std::string path = cost_model_path();
  std::ifstream f(path);
  if (!f) return builtin_cost_model();
  std::error_code ec;
  if (const auto n = std::filesystem::file_size(path, ec); !ec && n > max_cost_model_bytes) {
    log::warn(
        "cost model {}: {} bytes is more than the {} a cost model file may hold; using the "
        "built-in cost model",
        path, n, max_cost_model_bytes);
    return builtin_cost_model();
  }
  std::stringstream ss;
  ss << f.rdbuf();
  try {
    return cost_model::from_json(ss.str(), path);
  } catch (const error& e) {
    log::warn("{}; using the built-in cost model", e.what());
    return builtin_cost_model();
  }
}

void save_cost_model(const cost_model& m, const std::string& path) {
  try {
    detail::write_file_atomically(path, m.to_json(), {.create_directories = true});
  } catch (const detail::file_write_error& e) {
    throw usage_error(fmt::format("cannot save the cost model: {}", e.what()));
  }
}

}  // namespace ringflow
