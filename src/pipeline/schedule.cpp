// Schedule IR helpers, the GPipe / 1F1B / interleaved generators and the text format.
#include "ringflow/pipeline/schedule.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <charconv>
#include <utility>

#include "ringflow/core/error.hpp"
#include "ringflow/pipeline/verify.hpp"

namespace ringflow::pipeline {

namespace {

struct op_names {
  op_kind op;
  std::string_view name;
  std::string_view mnemonic;
};

constexpr std::array<op_names, 10> all_ops{{
    {op_kind::forward, "forward", "F"},
    {op_kind::backward, "backward", "B"},
    {op_kind::backward_input, "backward_input", "BI"},
    {op_kind::backward_weight, "backward_weight", "BW"},
    {op_kind::send_activation, "send_activation", "SA"},
    {op_kind::recv_activation, "recv_activation", "RA"},
    {op_kind::send_grad, "send_grad", "SG"},
    {op_kind::recv_grad, "recv_grad", "RG"},
    {op_kind::reduce_grads, "reduce_grads", "REDUCE"},
    {op_kind::optimizer_step, "optimizer_step", "STEP"},
}};

void check_counts(const char* what, int ranks, int micro_batches, int chunks = 1) {
  if (ranks < 1 || micro_batches < 1 || chunks < 1) {
    throw usage_error(fmt::format(
        "pipeline::{}: ranks ({}), micro-batches ({}) and chunks ({}) must all be at least 1", what,
        ranks, micro_batches, chunks));
  }
}

// Appends RA, F, SA of (stage, mb): receive the input unless first, send the
// output unless last.
void emit_forward(std::vector<instruction>& prog, int stage, int mb, int stages) {
  if (stage > 0) prog.push_back({op_kind::recv_activation, stage, mb});
  prog.push_back({op_kind::forward, stage, mb});
  if (stage + 1 < stages) prog.push_back({op_kind::send_activation, stage, mb});
}

// Appends RG, B (or BI ... BW), SG of (stage, mb). With the split the input
// gradient leaves before the weight gradients are computed, so the upstream
// rank can start sooner.
void emit_backward(std::vector<instruction>& prog, int stage, int mb, int stages, bool split) {
  if (stage + 1 < stages) prog.push_back({op_kind::recv_grad, stage, mb});
  if (split) {
    prog.push_back({op_kind::backward_input, stage, mb});
    if (stage > 0) prog.push_back({op_kind::send_grad, stage, mb});
    prog.push_back({op_kind::backward_weight, stage, mb});
  } else {
    prog.push_back({op_kind::backward, stage, mb});
    if (stage > 0) prog.push_back({op_kind::send_grad, stage, mb});
  }
}

void finish(schedule& s, const generate_options& opts) {
  if (!opts.reduce_and_step) return;
  for (auto& prog : s.programs) {
    prog.push_back({op_kind::reduce_grads, -1, -1});
    prog.push_back({op_kind::optimizer_step, -1, -1});
  }
}

schedule blank(std::string name, int ranks, int stages, int micro_batches) {
  schedule s;
  s.name = std::move(name);
  s.micro_batches = micro_batches;
  s.stage_rank.resize(static_cast<std::size_t>(stages));
  for (int st = 0; st < stages; ++st) s.stage_rank[static_cast<std::size_t>(st)] = st % ranks;
  s.programs.resize(static_cast<std::size_t>(ranks));
  return s;
}

// One (chunk, micro-batch) unit of an interleaved rank, in Megatron order:
// micro-batches in groups of `ranks`; within a group every chunk in turn
// runs the whole group (backward: chunks in reverse).
struct unit {
  int chunk;
  int mb;
};

std::vector<unit> interleaved_order(int ranks, int chunks, int micro_batches, bool backward) {
  std::vector<unit> order;
  for (int first = 0; first < micro_batches; first += ranks) {
    const int last = std::min(micro_batches, first + ranks);
    for (int c = 0; c < chunks; ++c) {
      const int chunk = backward ? chunks - 1 - c : c;
      for (int mb = first; mb < last; ++mb) order.push_back({chunk, mb});
    }
  }
  return order;
}

schedule build_interleaved(int ranks, int chunks, int micro_batches, const generate_options& opts,
                           int extra_warmup) {
  const int stages = ranks * chunks;
  schedule s = blank(chunks == 1 ? "1f1b" : "interleaved", ranks, stages, micro_batches);
  const auto fwd = interleaved_order(ranks, chunks, micro_batches, false);
  const auto bwd = interleaved_order(ranks, chunks, micro_batches, true);
  const int total = micro_batches * chunks;
  for (int r = 0; r < ranks; ++r) {
    auto& prog = s.programs[static_cast<std::size_t>(r)];
    // Megatron's warm-up: enough forwards that the first backward's
    // gradient can have come back from the last stage.
    const int textbook = chunks == 1 ? ranks - r - 1 : (ranks - r - 1) * 2 + (chunks - 1) * ranks;
    const int warmup = std::min(total, textbook + extra_warmup);
    int f = 0;
    int b = 0;
    const auto forward = [&] {
      const unit u = fwd[static_cast<std::size_t>(f++)];
      emit_forward(prog, u.chunk * ranks + r, u.mb, stages);
    };
    const auto backward = [&] {
      const unit u = bwd[static_cast<std::size_t>(b++)];
      emit_backward(prog, u.chunk * ranks + r, u.mb, stages, opts.split_backward);
    };
    while (f < warmup) forward();
    while (f < total) {
      forward();
      backward();
    }
    while (b < total) backward();
  }
  finish(s, opts);
  return s;
}

}  // namespace

std::string_view op_name(op_kind op) {
  for (const auto& o : all_ops) {
    if (o.op == op) return o.name;
  }
  return "unknown";
}

std::string_view op_mnemonic(op_kind op) {
  for (const auto& o : all_ops) {
    if (o.op == op) return o.mnemonic;
  }
  return "?";
}

bool is_compute(op_kind op) {
  return op == op_kind::forward || op == op_kind::backward || op == op_kind::backward_input ||
         op == op_kind::backward_weight;
}
bool is_recv(op_kind op) { return op == op_kind::recv_activation || op == op_kind::recv_grad; }
bool is_send(op_kind op) { return op == op_kind::send_activation || op == op_kind::send_grad; }

std::string to_string(const instruction& ins) {
  if (ins.op == op_kind::reduce_grads || ins.op == op_kind::optimizer_step) {
    return std::string(op_mnemonic(ins.op));
  }
  return fmt::format("{}{}.{}", op_mnemonic(ins.op), ins.stage, ins.micro_batch);
}

int schedule::rank_of(int stage) const {
  if (stage < 0 || stage >= stages()) {
    throw usage_error(
        fmt::format("pipeline::schedule '{}': stage {} is outside [0, {})", name, stage, stages()));
  }
  return stage_rank[static_cast<std::size_t>(stage)];
}

std::vector<int> schedule::stages_on(int rank) const {
  std::vector<int> out;
  for (int s = 0; s < stages(); ++s) {
    if (stage_rank[static_cast<std::size_t>(s)] == rank) out.push_back(s);
  }
  return out;
}

schedule gpipe(int ranks, int micro_batches, generate_options opts) {
  check_counts("gpipe", ranks, micro_batches);
  schedule s = blank("gpipe", ranks, ranks, micro_batches);
  for (int r = 0; r < ranks; ++r) {
    auto& prog = s.programs[static_cast<std::size_t>(r)];
    for (int mb = 0; mb < micro_batches; ++mb) emit_forward(prog, r, mb, ranks);
    for (int mb = 0; mb < micro_batches; ++mb) {
      emit_backward(prog, r, mb, ranks, opts.split_backward);
    }
  }
  finish(s, opts);
  return s;
}

schedule one_f_one_b(int ranks, int micro_batches, generate_options opts) {
  check_counts("one_f_one_b", ranks, micro_batches);
  return build_interleaved(ranks, 1, micro_batches, opts, 0);
}

schedule interleaved_1f1b(int ranks, int chunks, int micro_batches, generate_options opts) {
  check_counts("interleaved_1f1b", ranks, micro_batches, chunks);
  // The textbook warm-up assumes full groups of `ranks` micro-batches; with
  // a partial group it can deadlock. Lengthen the warm-up until the verifier
  // accepts it: all forwards first (extra = total) is always deadlock-free.
  const int total = micro_batches * chunks;
  for (int extra = 0;; ++extra) {
    schedule s = build_interleaved(ranks, chunks, micro_batches, opts, extra);
    if (extra >= total) return s;
    try {
      verify(s);
      return s;
    } catch (const usage_error&) {
      // Deadlocks; try a longer warm-up.
    }
  }
}

schedule forward_pass(std::vector<int> stage_rank, int ranks, int micro_batches) {
  check_counts("forward_pass", ranks, micro_batches);
  schedule s;
  s.name = "forward";
  s.micro_batches = micro_batches;
  s.forward_only = true;
  s.stage_rank = std::move(stage_rank);
  s.programs.resize(static_cast<std::size_t>(ranks));
  for (int r = 0; r < ranks; ++r) {
    for (int st : s.stages_on(r)) {
      for (int mb = 0; mb < micro_batches; ++mb) {
        emit_forward(s.programs[static_cast<std::size_t>(r)], st, mb, s.stages());
      }
    }
  }
  return s;
}

schedule make_schedule(std::string_view kind, int ranks, int micro_batches, int chunks,
                       generate_options opts) {
  if (kind == "gpipe") return gpipe(ranks, micro_batches, opts);
  if (kind == "1f1b") return one_f_one_b(ranks, micro_batches, opts);
  if (kind == "interleaved") return interleaved_1f1b(ranks, chunks, micro_batches, opts);
  throw usage_error(fmt::format(
      "pipeline::make_schedule: unknown schedule '{}'; use gpipe, 1f1b or interleaved", kind));
}

// ---------------------------------------------------------------------------
// Text format

std::string to_text(const schedule& s) {
  std::string out = fmt::format("schedule {} micro_batches {}{}\nplacement", s.name,
                                s.micro_batches, s.forward_only ? " forward_only" : "");
  for (int r : s.stage_rank) out += fmt::format(" {}", r);
  out += '\n';
  for (int r = 0; r < s.ranks(); ++r) {
    out += fmt::format("rank {}:", r);
    for (const auto& ins : s.programs[static_cast<std::size_t>(r)]) {
      out += ' ';
      out += to_string(ins);
    }
    out += '\n';
  }
  return out;
}

namespace {

std::vector<std::string_view> split_words(std::string_view line) {
  std::vector<std::string_view> words;
  std::size_t i = 0;
  while (i < line.size()) {
    while (i < line.size() && (std::isspace(static_cast<unsigned char>(line[i])) || line[i] == ','))
      ++i;
    std::size_t j = i;
    while (j < line.size() && !std::isspace(static_cast<unsigned char>(line[j])) && line[j] != ',')
      ++j;
    if (j > i) words.push_back(line.substr(i, j - i));
    i = j;
  }
  return words;
}

// Bounds of the text format: far beyond any real pipeline, small enough
// that a corrupt file cannot make the parser or the verifier allocate or
// loop without end.
constexpr int max_text_ranks = 1 << 16;
constexpr int max_text_stages = 1 << 16;
constexpr int max_text_micro_batches = 1 << 20;

bool parse_int(std::string_view text, int& out) {
  if (text.empty()) return false;
  const auto r = std::from_chars(text.data(), text.data() + text.size(), out);
  return r.ec == std::errc() && r.ptr == text.data() + text.size();
}

}  // namespace

schedule parse_schedule(std::string_view text) {
  schedule s;
  int current = -1;
  int line_no = 0;
  const auto fail = [&](const std::string& why) -> usage_error {
    return usage_error(fmt::format("pipeline::parse_schedule: line {}: {}", line_no, why));
  };
  std::size_t pos = 0;
  while (pos <= text.size()) {
    const std::size_t nl = text.find('\n', pos);
    std::string_view line = text.substr(pos, nl == std::string_view::npos ? text.npos : nl - pos);
    pos = nl == std::string_view::npos ? text.size() + 1 : nl + 1;
    ++line_no;
    if (const auto hash = line.find('#'); hash != line.npos) line = line.substr(0, hash);
    auto words = split_words(line);
    if (words.empty()) continue;
    std::size_t first = 0;
    if (words[0] == "schedule") {
      if (words.size() < 4 || words[2] != "micro_batches" ||
          !parse_int(words[3], s.micro_batches)) {
        throw fail("expected 'schedule <name> micro_batches <m> [forward_only]'");
      }
      if (s.micro_batches < 1 || s.micro_batches > max_text_micro_batches) {
        throw fail(fmt::format("micro_batches {} is outside [1, {}]", s.micro_batches,
                               max_text_micro_batches));
      }
      s.name = std::string(words[1]);
      s.forward_only = words.size() > 4 && words[4] == "forward_only";
      continue;
    }
    if (words[0] == "placement") {
      s.stage_rank.clear();
      for (std::size_t i = 1; i < words.size(); ++i) {
        int r = 0;
        if (!parse_int(words[i], r) || r < 0 || r >= max_text_ranks) {
          throw fail(
              fmt::format("placement: '{}' is not a rank in [0, {})", words[i], max_text_ranks));
        }
        if (s.stage_rank.size() >= static_cast<std::size_t>(max_text_stages)) {
          throw fail(fmt::format("placement: more than {} stages", max_text_stages));
        }
        s.stage_rank.push_back(r);
      }
      continue;
    }
    if (words[0] == "rank") {
      std::string_view num = words.size() > 1 ? words[1] : std::string_view{};
      if (!num.empty() && num.back() == ':') num.remove_suffix(1);
      if (!parse_int(num, current) || current < 0 || current >= max_text_ranks) {
        throw fail(fmt::format("expected 'rank <r>:' with r in [0, {})", max_text_ranks));
      }
      if (s.programs.size() <= static_cast<std::size_t>(current)) {
        s.programs.resize(static_cast<std::size_t>(current) + 1);
      }
      first = 2;
      if (words.size() > 2 && words[2] == ":") first = 3;
    }
    for (std::size_t i = first; i < words.size(); ++i) {
      if (current < 0) throw fail(fmt::format("'{}' comes before any 'rank <r>:' line", words[i]));
      const std::string_view w = words[i];
      instruction ins;
      bool found = false;
      if (w == "REDUCE" || w == "STEP") {
        ins = {w == "REDUCE" ? op_kind::reduce_grads : op_kind::optimizer_step, -1, -1};
        found = true;
      } else {
        std::size_t letters = 0;
        while (letters < w.size() && std::isalpha(static_cast<unsigned char>(w[letters])))
          ++letters;
        const std::string_view mn = w.substr(0, letters);
        const std::string_view rest = w.substr(letters);
        const auto dot = rest.find('.');
        for (const auto& o : all_ops) {
          if (o.mnemonic == mn && dot != rest.npos && parse_int(rest.substr(0, dot), ins.stage) &&
              parse_int(rest.substr(dot + 1), ins.micro_batch)) {
            ins.op = o.op;
            found = o.op != op_kind::reduce_grads && o.op != op_kind::optimizer_step;
          }
        }
      }
      if (!found) {
        throw fail(fmt::format(
            "'{}' is not an instruction; use F, B, BI, BW, SA, RA, SG or RG followed by "
            "<stage>.<micro-batch> (e.g. F0.3), REDUCE or STEP",
            w));
      }
      if (ins.op != op_kind::reduce_grads && ins.op != op_kind::optimizer_step &&
          (ins.stage < 0 || ins.stage >= max_text_stages || ins.micro_batch < 0 ||
           ins.micro_batch >= max_text_micro_batches)) {
        throw fail(fmt::format("'{}': the stage must be in [0, {}) and the micro-batch in [0, {})",
                               w, max_text_stages, max_text_micro_batches));
      }
      s.programs[static_cast<std::size_t>(current)].push_back(ins);
    }
  }
  if (s.stage_rank.empty()) {
    // Default placement: one stage per rank.
    for (int r = 0; r < s.ranks(); ++r) s.stage_rank.push_back(r);
  }
  return s;
}

// ---------------------------------------------------------------------------
// Builder

schedule_builder::schedule_builder(int ranks, int stages, int micro_batches) {
  check_counts("schedule_builder", ranks, micro_batches);
  if (stages < 1) throw usage_error("pipeline::schedule_builder: stages must be at least 1");
  schedule_ = blank("custom", ranks, stages, micro_batches);
}

schedule_builder& schedule_builder::on(int rank) {
  if (rank < 0 || rank >= schedule_.ranks()) {
    throw usage_error(fmt::format("pipeline::schedule_builder::on: rank {} is outside [0, {})",
                                  rank, schedule_.ranks()));
  }
  current_ = rank;
  return *this;
}

schedule_builder& schedule_builder::add(instruction ins) {
  schedule_.programs[static_cast<std::size_t>(current_)].push_back(ins);
  return *this;
}

}  // namespace ringflow::pipeline
