// The schedule verifier (structure, matching, deadlock simulation, timing
// prediction) and the pictures of a timeline: ASCII grid and SVG.
#include "ringflow/pipeline/verify.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <optional>
#include <tuple>

#include "ringflow/core/error.hpp"

namespace ringflow::pipeline {

namespace {

struct where {
  int rank = -1;
  std::size_t step = 0;
};

using key = std::tuple<op_kind, int, int>;  // op, stage, micro-batch

class checker {
 public:
  explicit checker(const schedule& s) : s_(s) {}

  void run() {
    check_shape();
    index_instructions();
    check_coverage();
  }

  std::optional<where> find(op_kind op, int stage, int mb) const {
    auto it = at_.find({op, stage, mb});
    if (it == at_.end()) return std::nullopt;
    return it->second;
  }

 private:
  [[noreturn]] void fail(const std::string& why) const {
    throw usage_error(fmt::format("pipeline::verify: schedule '{}': {}", s_.name, why));
  }

  std::string at(const where& w) const { return fmt::format("rank {} step {}", w.rank, w.step); }

  void check_shape() const {
    if (s_.ranks() < 1) fail("it has no rank programs");
    if (s_.stages() < 1) fail("it has no stages (empty placement)");
    if (s_.micro_batches < 1) fail(fmt::format("micro_batches is {}", s_.micro_batches));
    for (int st = 0; st < s_.stages(); ++st) {
      const int r = s_.stage_rank[static_cast<std::size_t>(st)];
      if (r < 0 || r >= s_.ranks()) {
        fail(fmt::format("stage {} is placed on rank {}, but there are {} ranks", st, r,
                         s_.ranks()));
      }
    }
  }

  void index_instructions() {
    const int S = s_.stages();
    for (int r = 0; r < s_.ranks(); ++r) {
      const auto& prog = s_.programs[static_cast<std::size_t>(r)];
      for (std::size_t i = 0; i < prog.size(); ++i) {
        const instruction& ins = prog[i];
        const where w{r, i};
        if (ins.op == op_kind::reduce_grads || ins.op == op_kind::optimizer_step) {
          if (s_.forward_only)
            fail(fmt::format("{} at {} in a forward-only schedule", to_string(ins), at(w)));
          rank_wide_.emplace_back(ins, w);
          continue;
        }
        if (ins.stage < 0 || ins.stage >= S) {
          fail(fmt::format("{} at {} names stage {}, outside [0, {})", to_string(ins), at(w),
                           ins.stage, S));
        }
        if (ins.micro_batch < 0 || ins.micro_batch >= s_.micro_batches) {
          fail(fmt::format("{} at {} names micro-batch {}, outside [0, {})", to_string(ins), at(w),
                           ins.micro_batch, s_.micro_batches));
        }
        if (s_.rank_of(ins.stage) != r) {
          fail(fmt::format("{} at {}: stage {} lives on rank {}, not on rank {}", to_string(ins),
                           at(w), ins.stage, s_.rank_of(ins.stage), r));
        }
        if ((ins.op == op_kind::send_activation || ins.op == op_kind::recv_grad) &&
            ins.stage == S - 1) {
          fail(fmt::format("{} at {}: stage {} is the last stage; it has no next stage",
                           to_string(ins), at(w), ins.stage));
        }
        if ((ins.op == op_kind::recv_activation || ins.op == op_kind::send_grad) &&
            ins.stage == 0) {
          fail(fmt::format("{} at {}: stage 0 is the first stage; it has no previous stage",
                           to_string(ins), at(w)));
        }
        if (s_.forward_only && ins.op != op_kind::forward && ins.op != op_kind::send_activation &&
            ins.op != op_kind::recv_activation) {
          fail(fmt::format("{} at {} in a forward-only schedule", to_string(ins), at(w)));
        }
        const auto [it, fresh] = at_.emplace(key{ins.op, ins.stage, ins.micro_batch}, w);
        if (!fresh) {
          fail(fmt::format("{} appears twice: at {} and at {}", to_string(ins), at(it->second),
                           at(w)));
        }
      }
    }
  }

  // `later` must exist and come after `earlier` on the same rank.
  void need_before(const instruction& earlier, const instruction& later, const char* why) const {
    const auto l = find(later.op, later.stage, later.micro_batch);
    if (!l) return;
    const auto e = find(earlier.op, earlier.stage, earlier.micro_batch);
    if (!e) {
      fail(fmt::format("{} at {} {}, but {} is missing from rank {}'s program", to_string(later),
                       at(*l), why, to_string(earlier), l->rank));
    }
    if (e->step > l->step) {
      fail(fmt::format("{} at {} {}, but {} only comes at step {}", to_string(later), at(*l), why,
                       to_string(earlier), e->step));
    }
  }

  void need(const instruction& ins, const std::string& why) const {
    if (!find(ins.op, ins.stage, ins.micro_batch)) {
      fail(fmt::format("{} is missing from rank {}'s program: {}", to_string(ins),
                       s_.rank_of(ins.stage), why));
    }
  }

  void check_coverage() const {
    const int S = s_.stages();
    std::vector<std::size_t> last_backward(static_cast<std::size_t>(s_.ranks()), 0);
    std::vector<std::optional<instruction>> last_backward_ins(static_cast<std::size_t>(s_.ranks()));
    for (int st = 0; st < S; ++st) {
      for (int mb = 0; mb < s_.micro_batches; ++mb) {
        const instruction F{op_kind::forward, st, mb}, B{op_kind::backward, st, mb},
            BI{op_kind::backward_input, st, mb}, BW{op_kind::backward_weight, st, mb},
            SA{op_kind::send_activation, st, mb}, RA{op_kind::recv_activation, st, mb},
            SG{op_kind::send_grad, st, mb}, RG{op_kind::recv_grad, st, mb};
        need(F, fmt::format("stage {} never runs forward on micro-batch {}", st, mb));
        if (st > 0) {
          need(RA, fmt::format("F{}.{} needs its input from stage {}", st, mb, st - 1));
          need_before(RA, F, "uses its input");
          need({op_kind::send_activation, st - 1, mb},
               fmt::format("rank {} waits for it in RA{}.{}", s_.rank_of(st), st, mb));
        }
        if (st + 1 < S) {
          need_before(F, SA, "sends the stage output");
          need({op_kind::recv_activation, st + 1, mb},
               fmt::format("nobody receives SA{}.{} from rank {}", st, mb, s_.rank_of(st)));
        }
        if (s_.forward_only) continue;
        const bool whole = find(B.op, st, mb).has_value();
        const bool split = find(BI.op, st, mb).has_value() || find(BW.op, st, mb).has_value();
        if (whole && split) {
          fail(fmt::format("stage {} micro-batch {} has both B and BI/BW; use one or the other", st,
                           mb));
        }
        if (!whole && !split)
          need(B, fmt::format("stage {} never runs backward on micro-batch {}", st, mb));
        const instruction& first_bwd = whole ? B : BI;
        if (split) {
          need(BI, fmt::format("BW{}.{} needs its input-gradient pass first", st, mb));
          need(BW, fmt::format("the weight gradients of BI{}.{} are never computed", st, mb));
          need_before(BI, BW, "computes deferred weight gradients");
        }
        need_before(F, first_bwd, "differentiates the forward pass");
        if (st + 1 < S) {
          need(RG, fmt::format("{} needs the output gradient from stage {}", to_string(first_bwd),
                               st + 1));
          need_before(RG, first_bwd, "uses the output gradient");
          need({op_kind::send_grad, st + 1, mb},
               fmt::format("rank {} waits for it in RG{}.{}", s_.rank_of(st), st, mb));
        }
        if (st > 0) {
          need_before(first_bwd, SG, "sends the input gradient");
          need({op_kind::recv_grad, st - 1, mb},
               fmt::format("nobody receives SG{}.{} from rank {}", st, mb, s_.rank_of(st)));
        }
        const instruction& last_bwd = whole ? B : BW;
        const auto w = *find(last_bwd.op, st, mb);
        auto& lb = last_backward[static_cast<std::size_t>(w.rank)];
        if (!last_backward_ins[static_cast<std::size_t>(w.rank)] || w.step > lb) {
          lb = w.step;
          last_backward_ins[static_cast<std::size_t>(w.rank)] = last_bwd;
        }
      }
    }
    for (const auto& [ins, w] : rank_wide_) {
      const auto& lbi = last_backward_ins[static_cast<std::size_t>(w.rank)];
      if (lbi && last_backward[static_cast<std::size_t>(w.rank)] > w.step) {
        fail(fmt::format("{} at {} comes before {} (step {}): it would use incomplete gradients",
                         to_string(ins), at(w), to_string(*lbi),
                         last_backward[static_cast<std::size_t>(w.rank)]));
      }
    }
  }

  const schedule& s_;
  std::map<key, where> at_;
  std::vector<std::pair<instruction, where>> rank_wide_;
};

double cost_of(const instruction& ins, const stage_costs& c) {
  // Only compute instructions name a stage with a cost: transfers cost
  // nothing here, and rank-wide ones (REDUCE, STEP) have stage -1, so the
  // per-stage tables must not be indexed for them (verify() has checked that
  // non-empty tables have one entry per stage; the checker, that compute
  // stages are in range).
  if (!is_compute(ins.op)) return 0.0;
  const auto st = static_cast<std::size_t>(ins.stage);
  const double f = c.forward.empty() ? 1.0 : c.forward.at(st);
  const double b = c.backward.empty() ? 2.0 : c.backward.at(st);
  switch (ins.op) {
    case op_kind::forward: return f;
    case op_kind::backward: return b;
    case op_kind::backward_input: return b * (1.0 - c.weight_fraction);
    case op_kind::backward_weight: return b * c.weight_fraction;
    default: return 0.0;
  }
}

// The instruction that produces what a receive waits for.
instruction matching_send(const instruction& recv) {
  if (recv.op == op_kind::recv_activation) {
    return {op_kind::send_activation, recv.stage - 1, recv.micro_batch};
  }
  return {op_kind::send_grad, recv.stage + 1, recv.micro_batch};
}

std::string deadlock_report(const schedule& s, const checker& c,
                            const std::vector<std::size_t>& pc) {
  // Blocked receives and the sends they wait for.
  std::map<std::pair<int, std::size_t>, char> mark;
  std::string why;
  std::size_t lo = SIZE_MAX, hi = 0, done = 0, total = 0;
  for (int r = 0; r < s.ranks(); ++r) {
    const auto& prog = s.programs[static_cast<std::size_t>(r)];
    total += prog.size();
    const std::size_t p = pc[static_cast<std::size_t>(r)];
    done += p;
    if (p >= prog.size()) continue;
    const instruction& ins = prog[p];
    const instruction snd = matching_send(ins);
    const auto w = c.find(snd.op, snd.stage, snd.micro_batch);
    mark[{r, p}] = '[';
    lo = std::min(lo, p);
    hi = std::max(hi, p);
    if (w) {
      mark.emplace(std::pair{w->rank, w->step}, '<');
      hi = std::max(hi, w->step);
      why += fmt::format(
          "  rank {} step {}: {} waits for {} at rank {} step {}, which rank {} "
          "has not reached (it is stuck at step {})\n",
          r, p, to_string(ins), to_string(snd), w->rank, w->step, w->rank,
          pc[static_cast<std::size_t>(w->rank)]);
    }
  }
  lo = lo >= 2 ? lo - 2 : 0;
  std::size_t longest = 0;
  for (const auto& prog : s.programs) longest = std::max(longest, prog.size());
  hi = std::min(longest, hi + 2);
  std::size_t width = 6;
  for (const auto& prog : s.programs) {
    for (const auto& ins : prog) width = std::max(width, to_string(ins).size() + 3);
  }
  std::string grid = fmt::format("{:<8}", "step");
  for (std::size_t i = lo; i < hi; ++i) grid += fmt::format(" {:<{}}", i, width - 1);
  while (!grid.empty() && grid.back() == ' ') grid.pop_back();
  grid += '\n';
  for (int r = 0; r < s.ranks(); ++r) {
    const auto& prog = s.programs[static_cast<std::size_t>(r)];
    grid += fmt::format("{:<8}", fmt::format("rank {}", r));
    for (std::size_t i = lo; i < hi; ++i) {
      std::string cell;
      if (i < prog.size()) {
        cell = to_string(prog[i]);
        const auto m = mark.find({r, i});
        if (m != mark.end()) {
          cell = m->second == '[' ? "[" + cell + "]" : "<" + cell + ">";
        } else {
          cell = " " + cell;
        }
      }
      grid += fmt::format("{:<{}}", cell, width);
    }
    while (!grid.empty() && grid.back() == ' ') grid.pop_back();
    grid += '\n';
  }
  return fmt::format(
      "pipeline::verify: schedule '{}' deadlocks after {} of {} instructions: every unfinished "
      "rank is blocked in a receive whose send comes later in its peer's program.\n"
      "First stuck step ([blocked receive], <the send it waits for>; steps {}..{}):\n{}{}"
      "Reorder the programs so each send comes before the peer's receive that waits for it.",
      s.name, done, total, lo, hi == 0 ? 0 : hi - 1, grid, why);
}

}  // namespace

stage_costs stage_costs::uniform(int stages, double f, double b) {
  stage_costs c;
  c.forward.assign(static_cast<std::size_t>(std::max(stages, 0)), f);
  c.backward.assign(static_cast<std::size_t>(std::max(stages, 0)), b);
  return c;
}

double textbook_bubble(int ranks, int micro_batches) {
  return static_cast<double>(ranks - 1) / static_cast<double>(micro_batches + ranks - 1);
}

verify_report verify(const schedule& s, const stage_costs& costs) {
  checker c(s);
  c.run();
  const auto S = static_cast<std::size_t>(s.stages());
  if ((!costs.forward.empty() && costs.forward.size() != S) ||
      (!costs.backward.empty() && costs.backward.size() != S)) {
    throw usage_error(fmt::format(
        "pipeline::verify: schedule '{}' has {} stages but the costs give {} forward and {} "
        "backward times",
        s.name, S, costs.forward.size(), costs.backward.size()));
  }

  const auto P = static_cast<std::size_t>(s.ranks());
  verify_report rep;
  rep.peak_activations.assign(P, 0);
  rep.busy.assign(P, 0.0);
  std::vector<std::size_t> pc(P, 0);
  std::vector<double> clock(P, 0.0);
  std::vector<int> live(P, 0);
  // When the data of a send is available at its receiver: keyed by the
  // receive instruction it satisfies.
  std::map<key, double> arrived;
  bool progress = true;
  while (progress) {
    progress = false;
    for (std::size_t r = 0; r < P; ++r) {
      const auto& prog = s.programs[r];
      while (pc[r] < prog.size()) {
        const instruction& ins = prog[pc[r]];
        double start = clock[r];
        if (is_recv(ins.op)) {
          auto it = arrived.find({ins.op, ins.stage, ins.micro_batch});
          if (it == arrived.end()) break;
          start = std::max(start, it->second);
        }
        const double end = start + cost_of(ins, costs);
        clock[r] = end;
        if (ins.op == op_kind::send_activation) {
          arrived[{op_kind::recv_activation, ins.stage + 1, ins.micro_batch}] =
              end + costs.transfer;
        } else if (ins.op == op_kind::send_grad) {
          arrived[{op_kind::recv_grad, ins.stage - 1, ins.micro_batch}] = end + costs.transfer;
        }
        if (is_compute(ins.op)) {
          rep.busy[r] += end - start;
          rep.timeline.push_back({static_cast<int>(r), pc[r], ins, start, end});
        }
        if (ins.op == op_kind::forward) {
          rep.peak_activations[r] = std::max(rep.peak_activations[r], ++live[r]);
        } else if (ins.op == op_kind::backward || ins.op == op_kind::backward_weight) {
          --live[r];
        }
        ++pc[r];
        progress = true;
      }
    }
  }
  for (std::size_t r = 0; r < P; ++r) {
    if (pc[r] < s.programs[r].size()) throw usage_error(deadlock_report(s, c, pc));
  }
  rep.makespan = *std::max_element(clock.begin(), clock.end());
  double busy = 0.0;
  for (double b : rep.busy) busy += b;
  rep.bubble_fraction =
      rep.makespan > 0 ? 1.0 - busy / (static_cast<double>(P) * rep.makespan) : 0.0;
  return rep;
}

// ---------------------------------------------------------------------------
// Pictures

namespace {

std::string cell_label(const schedule& s, const instruction& ins) {
  const char* k = ins.op == op_kind::forward          ? "F"
                  : ins.op == op_kind::backward       ? "B"
                  : ins.op == op_kind::backward_input ? "b"
                                                      : "W";
  std::string label = fmt::format("{}{}", k, ins.micro_batch);
  if (s.stages() > s.ranks()) {
    const auto on = s.stages_on(s.rank_of(ins.stage));
    const auto chunk = std::find(on.begin(), on.end(), ins.stage) - on.begin();
    label += fmt::format(".{}", chunk);
  }
  return label;
}

}  // namespace

std::string ascii_grid(const schedule& s, const verify_report& r) {
  double unit = 0.0;
  for (const auto& op : r.timeline) {
    const double d = op.end - op.start;
    if (d > 0 && (unit == 0.0 || d < unit)) unit = d;
  }
  if (unit == 0.0) unit = 1.0;
  const auto cols = static_cast<std::size_t>(std::ceil(r.makespan / unit - 1e-9));
  std::size_t width = 2;
  for (const auto& op : r.timeline) width = std::max(width, cell_label(s, op.ins).size());
  std::vector<std::vector<std::string>> cells(static_cast<std::size_t>(s.ranks()),
                                              std::vector<std::string>(cols, "."));
  for (const auto& op : r.timeline) {
    const auto a = static_cast<std::size_t>(std::llround(op.start / unit));
    const auto b = static_cast<std::size_t>(std::llround(op.end / unit));
    for (std::size_t t = a; t < b && t < cols; ++t) {
      cells[static_cast<std::size_t>(op.rank)][t] = cell_label(s, op.ins);
    }
  }
  std::string out =
      fmt::format("{}: {} ranks, {} stages, {} micro-batches; bubble {:.3f}, peak activations",
                  s.name, s.ranks(), s.stages(), s.micro_batches, r.bubble_fraction);
  for (int p : r.peak_activations) out += fmt::format(" {}", p);
  out += fmt::format(" (one column = {:g} time units)\n", unit);
  for (int rank = 0; rank < s.ranks(); ++rank) {
    std::string line = fmt::format("rank {:<2}|", rank);
    for (const auto& cell : cells[static_cast<std::size_t>(rank)]) {
      line += fmt::format(" {:<{}}", cell, width);
    }
    while (!line.empty() && line.back() == ' ') line.pop_back();
    out += line + '\n';
  }
  return out;
}

std::string ascii_grid(const schedule& s, const stage_costs& costs) {
  return ascii_grid(s, verify(s, costs));
}

std::string to_svg(const schedule& s, const verify_report& r, const std::string& title) {
  static constexpr const char* forward_fill[] = {"#4e79a7", "#8fb3d9", "#2c4a6e", "#b9d1ea"};
  static constexpr const char* backward_fill[] = {"#59a14f", "#98d08d", "#356b2f", "#c4e6bd"};
  static constexpr const char* weight_fill[] = {"#f28e2b", "#ffbe7d", "#b35f12", "#ffd9b0"};
  const double left = 70, top = 44, lane = 30, gap = 6, plot_width = 900;
  const double scale = r.makespan > 0 ? plot_width / r.makespan : 1.0;
  const double height = top + s.ranks() * (lane + gap) + 56;
  const double width = left + plot_width + 20;
  std::string out = fmt::format(
      "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{:.0f}\" height=\"{:.0f}\" "
      "viewBox=\"0 0 {:.0f} {:.0f}\" font-family=\"Helvetica,Arial,sans-serif\">\n"
      "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n",
      width, height, width, height);
  const std::string heading = title.empty()
                                  ? fmt::format("{}: {} ranks, {} stages, {} micro-batches", s.name,
                                                s.ranks(), s.stages(), s.micro_batches)
                                  : title;
  out += fmt::format(
      "<text x=\"{:.0f}\" y=\"20\" font-size=\"15\" font-weight=\"bold\">{}</text>\n"
      "<text x=\"{:.0f}\" y=\"36\" font-size=\"12\" fill=\"#555\">bubble {:.1f}%; "
      "peak in-flight activations per rank:",
      left, heading, left, 100.0 * r.bubble_fraction);
  for (int p : r.peak_activations) out += fmt::format(" {}", p);
  out += "</text>\n";
  for (int rank = 0; rank < s.ranks(); ++rank) {
    const double y = top + rank * (lane + gap);
    out += fmt::format(
        "<rect x=\"{:.0f}\" y=\"{:.1f}\" width=\"{:.0f}\" height=\"{:.0f}\" fill=\"#f2f2f2\"/>\n"
        "<text x=\"8\" y=\"{:.1f}\" font-size=\"13\">rank {}</text>\n",
        left, y, plot_width, lane, y + lane / 2 + 4, rank);
  }
  for (const auto& op : r.timeline) {
    const auto on = s.stages_on(op.rank);
    const auto chunk =
        static_cast<std::size_t>(std::find(on.begin(), on.end(), op.ins.stage) - on.begin()) % 4;
    const char* fill = op.ins.op == op_kind::forward           ? forward_fill[chunk]
                       : op.ins.op == op_kind::backward_weight ? weight_fill[chunk]
                                                               : backward_fill[chunk];
    const double x = left + op.start * scale;
    const double w = (op.end - op.start) * scale;
    const double y = top + op.rank * (lane + gap);
    out += fmt::format(
        "<rect x=\"{:.2f}\" y=\"{:.1f}\" width=\"{:.2f}\" height=\"{:.0f}\" fill=\"{}\" "
        "stroke=\"white\" stroke-width=\"1\"><title>{} (rank {} step {})</title></rect>\n",
        x, y, w, lane, fill, to_string(op.ins), op.rank, op.step);
    if (w >= 12) {
      const bool dark = chunk == 0 || chunk == 2;
      out += fmt::format(
          "<text x=\"{:.2f}\" y=\"{:.1f}\" font-size=\"{}\" text-anchor=\"middle\" "
          "fill=\"{}\">{}</text>\n",
          x + w / 2, y + lane / 2 + 4, w >= 22 ? 12 : 9, dark ? "white" : "black",
          op.ins.micro_batch);
    }
  }
  // Legend.
  const double ly = top + s.ranks() * (lane + gap) + 18;
  const struct {
    const char* fill;
    const char* text;
  } legend[] = {{forward_fill[0], "forward"},
                {backward_fill[0], "backward"},
                {weight_fill[0], "weight grads (BW)"},
                {forward_fill[1], "2nd model chunk (lighter)"}};
  double lx = left;
  const bool chunks = s.stages() > s.ranks();
  for (const auto& l : legend) {
    if (!chunks && l.fill == forward_fill[1]) continue;
    out += fmt::format(
        "<rect x=\"{:.0f}\" y=\"{:.0f}\" width=\"14\" height=\"14\" fill=\"{}\"/>"
        "<text x=\"{:.0f}\" y=\"{:.0f}\" font-size=\"12\">{}</text>\n",
        lx, ly, l.fill, lx + 20, ly + 12, l.text);
    lx += 200;
  }
  out += fmt::format(
      "<text x=\"{:.0f}\" y=\"{:.0f}\" font-size=\"11\" fill=\"#555\">time &#8594; (numbers: "
      "micro-batch)</text>\n</svg>\n",
      left, ly + 34);
  return out;
}

}  // namespace ringflow::pipeline
