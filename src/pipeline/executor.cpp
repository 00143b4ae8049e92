// The pipeline executor: one rank's program over point-to-point messages,
// and the Chrome trace writer.
#include "ringflow/pipeline/executor.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <deque>
#include <fstream>
#include <limits>
#include <map>
#include <tuple>

#include "core/json.hpp"
#include "ringflow/coll/collectives.hpp"
#include "ringflow/core/atomic_file.hpp"
#include "ringflow/core/env.hpp"
#include "ringflow/core/error.hpp"

namespace ringflow::pipeline {

namespace {

using clock_type = std::chrono::steady_clock;

double now_us() {
  return std::chrono::duration<double, std::micro>(clock_type::now().time_since_epoch()).count();
}

bool timeline_env() { return env::is_set("RINGFLOW_TIMELINE"); }

const char* category_of(op_kind op) {
  switch (op) {
    case op_kind::forward: return "forward";
    case op_kind::backward: return "backward";
    case op_kind::backward_input: return "backward";
    case op_kind::backward_weight: return "backward_weight";
    case op_kind::reduce_grads: return "reduce";
    case op_kind::optimizer_step: return "step";
    default: return "transfer";
  }
}

struct pending_send {
  std::vector<float> data;
  request req;
};

struct pending_recv {
  std::vector<float> data;
  request req;
};

}  // namespace

executor::executor(communicator comm, schedule s, executor_options opts)
    : comm_(std::move(comm)), schedule_(std::move(s)), opts_(opts) {
  if (!comm_.valid()) throw usage_error("pipeline::executor: the communicator is not valid");
  if (comm_.size() != schedule_.ranks()) {
    throw usage_error(fmt::format(
        "pipeline::executor on rank {}: the communicator has {} ranks but schedule '{}' has {} "
        "rank programs; use a pipeline communicator of that size (see make_grid)",
        comm_.rank(), comm_.size(), schedule_.name, schedule_.ranks()));
  }
  if (opts_.tag_base < 0 || opts_.tag_span < 2 ||
      opts_.tag_base + opts_.tag_span - 1 > max_user_tag) {
    throw usage_error(
        fmt::format("pipeline::executor on rank {}: tags [{}, {}) leave the user range [0, {}]",
                    comm_.rank(), opts_.tag_base, opts_.tag_base + opts_.tag_span, max_user_tag));
  }
  report_ = verify(schedule_);
  trace_ = opts_.trace || timeline_env();
}

int executor::tag_of(int boundary, int mb, int direction) const {
  const auto key = (static_cast<std::int64_t>(mb) * schedule_.stages() + boundary) * 2 + direction;
  return opts_.tag_base + static_cast<int>(key % opts_.tag_span);
}

run_stats executor::run(stage_runner& runner) {
  const int me = comm_.rank();
  const auto& prog = schedule_.programs[static_cast<std::size_t>(me)];
  const double t_run = now_us();
  run_stats stats;
  int live = 0;

  std::map<std::size_t, pending_recv> recvs;                           // by step
  std::map<std::tuple<int, int, int>, std::vector<float>> local_mail;  // (dir, stage, mb)
  std::map<std::pair<int, int>, std::vector<float>> inputs, grads;     // received, by (stage, mb)
  std::deque<pending_send> sends;

  // Receives are posted up to the second compute op ahead of the current
  // step, so a message can land while the current op computes.
  std::size_t posted = 0;
  const auto post_ahead = [&](std::size_t from) {
    std::size_t limit = from;
    int computes = 0;
    while (limit < prog.size()) {
      if (is_compute(prog[limit].op) && ++computes == 2) break;
      ++limit;
    }
    limit = std::min(prog.size(), limit + 1);
    for (; posted < limit; ++posted) {
      const instruction& ins = prog[posted];
      if (!is_recv(ins.op)) continue;
      const bool act = ins.op == op_kind::recv_activation;
      const int peer = schedule_.rank_of(act ? ins.stage - 1 : ins.stage + 1);
      if (peer == me) continue;
      pending_recv pr;
      pr.data.resize(act ? runner.input_elements(ins.stage, ins.micro_batch)
                         : runner.output_elements(ins.stage, ins.micro_batch));
      pr.req = comm_.irecv(std::span<float>(pr.data), peer,
                           tag_of(act ? ins.stage - 1 : ins.stage, ins.micro_batch, act ? 0 : 1));
      recvs.emplace(posted, std::move(pr));
    }
  };

  const auto send = [&](const instruction& ins, std::span<const float> data, std::size_t expected) {
    const bool act = ins.op == op_kind::send_activation;
    if (data.size() != expected) {
      throw usage_error(fmt::format(
          "pipeline::executor on rank {}: {} has {} elements but the runner announced {}", me,
          to_string(ins), data.size(), expected));
    }
    const int to_stage = act ? ins.stage + 1 : ins.stage - 1;
    const int peer = schedule_.rank_of(to_stage);
    std::vector<float> copy(data.begin(), data.end());
    if (peer == me) {
      local_mail[{act ? 0 : 1, to_stage, ins.micro_batch}] = std::move(copy);
      return;
    }
    pending_send ps;
    ps.data = std::move(copy);
    ps.req = comm_.isend(std::span<const float>(ps.data), peer,
                         tag_of(act ? ins.stage : to_stage, ins.micro_batch, act ? 0 : 1));
    sends.push_back(std::move(ps));
  };

  const auto receive = [&](std::size_t step, const instruction& ins) {
    const bool act = ins.op == op_kind::recv_activation;
    auto& into = act ? inputs : grads;
    const int peer = schedule_.rank_of(act ? ins.stage - 1 : ins.stage + 1);
    if (peer == me) {
      // The verifier guarantees the local send ran earlier in this program.
      auto it = local_mail.find({act ? 0 : 1, ins.stage, ins.micro_batch});
      into[{ins.stage, ins.micro_batch}] = std::move(it->second);
      local_mail.erase(it);
      return;
    }
    auto it = recvs.find(step);
    const double t0 = now_us();
    it->second.req.wait();
    const double t1 = now_us();
    stats.wait_seconds += (t1 - t0) * 1e-6;
    if (trace_ && t1 - t0 >= 1.0) {
      events_.push_back(
          {"wait " + to_string(ins), "wait", t0, t1 - t0, ins.stage, ins.micro_batch, ins.op});
    }
    into[{ins.stage, ins.micro_batch}] = std::move(it->second.data);
    recvs.erase(it);
  };

  const auto take = [](auto& from, int stage, int mb) {
    std::vector<float> v;
    auto it = from.find({stage, mb});
    if (it != from.end()) {
      v = std::move(it->second);
      from.erase(it);
    }
    return v;
  };

  runner.begin_run(schedule_);
  for (std::size_t i = 0; i < prog.size(); ++i) {
    post_ahead(i);
    const instruction& ins = prog[i];
    const double t0 = now_us();
    switch (ins.op) {
      case op_kind::recv_activation:
      case op_kind::recv_grad: receive(i, ins); break;
      case op_kind::send_activation:
        send(ins, runner.output(ins.stage, ins.micro_batch),
             runner.output_elements(ins.stage, ins.micro_batch));
        break;
      case op_kind::send_grad:
        send(ins, runner.input_grad(ins.stage, ins.micro_batch),
             runner.input_elements(ins.stage, ins.micro_batch));
        break;
      case op_kind::forward: {
        const auto in = take(inputs, ins.stage, ins.micro_batch);
        runner.forward(ins.stage, ins.micro_batch, in);
        stats.peak_activations = std::max(stats.peak_activations, ++live);
        break;
      }
      case op_kind::backward:
      case op_kind::backward_input: {
        const auto g = take(grads, ins.stage, ins.micro_batch);
        runner.backward(ins.stage, ins.micro_batch, g, ins.op == op_kind::backward_input);
        if (ins.op == op_kind::backward) --live;
        break;
      }
      case op_kind::backward_weight:
        runner.backward_weight(ins.stage, ins.micro_batch);
        --live;
        break;
      case op_kind::reduce_grads: runner.reduce_grads(); break;
      case op_kind::optimizer_step: runner.optimizer_step(); break;
    }
    const double t1 = now_us();
    if (is_compute(ins.op)) stats.compute_seconds += (t1 - t0) * 1e-6;
    if (trace_ && (is_compute(ins.op) || ins.op == op_kind::reduce_grads ||
                   ins.op == op_kind::optimizer_step)) {
      events_.push_back(
          {to_string(ins), category_of(ins.op), t0, t1 - t0, ins.stage, ins.micro_batch, ins.op});
    }
    // Free the buffers of sends that have completed, oldest first.
    while (!sends.empty() && sends.front().req.test()) sends.pop_front();
  }
  for (auto& s : sends) s.req.wait();
  runner.end_run();
  stats.seconds = (now_us() - t_run) * 1e-6;
  return stats;
}

// ---------------------------------------------------------------------------
// Chrome trace

namespace {

void append_events(std::string& out, const std::vector<trace_event>& events, int pid, double t0,
                   bool& first) {
  for (const auto& e : events) {
    out += first ? "\n" : ",\n";
    first = false;
    out += detail::json::trace_event(
        e.name, e.category, pid, 0, e.start_us - t0, e.duration_us,
        fmt::format(R"("stage":{},"micro_batch":{})", e.stage, e.micro_batch));
  }
}

std::string finish_json(std::string body, int ranks, int pid_offset) {
  std::string out = "{\"displayTimeUnit\":\"ms\",\"traceEvents\":[";
  bool first = true;
  for (int r = 0; r < ranks; ++r) {
    out += first ? "\n" : ",\n";
    first = false;
    out += fmt::format(R"({{"name":"process_name","ph":"M","pid":{},"args":{{"name":"rank {}"}}}})",
                       r + pid_offset, r + pid_offset);
  }
  if (!body.empty()) out += ",";
  out += body;
  out += "\n]}\n";
  return out;
}

}  // namespace

std::string chrome_trace_json(const std::vector<std::vector<trace_event>>& per_rank) {
  double t0 = std::numeric_limits<double>::infinity();
  for (const auto& events : per_rank) {
    for (const auto& e : events) t0 = std::min(t0, e.start_us);
  }
  if (!std::isfinite(t0)) t0 = 0;
  std::string body;
  bool first = true;
  for (std::size_t r = 0; r < per_rank.size(); ++r) {
    append_events(body, per_rank[r], static_cast<int>(r), t0, first);
  }
  return finish_json(body, static_cast<int>(per_rank.size()), 0);
}

verify_report measured_report(const schedule& s,
                              const std::vector<std::vector<trace_event>>& per_rank) {
  if (static_cast<int>(per_rank.size()) != s.ranks()) {
    throw usage_error(
        fmt::format("pipeline::measured_report: {} ranks of events for schedule "
                    "'{}' of {} ranks",
                    per_rank.size(), s.name, s.ranks()));
  }
  double t0 = std::numeric_limits<double>::infinity();
  for (const auto& events : per_rank) {
    for (const auto& e : events) t0 = std::min(t0, e.start_us);
  }
  verify_report rep;
  rep.peak_activations.assign(per_rank.size(), 0);
  rep.busy.assign(per_rank.size(), 0.0);
  for (std::size_t r = 0; r < per_rank.size(); ++r) {
    int live = 0;
    std::size_t step = 0;
    for (const auto& e : per_rank[r]) {
      if (!is_compute(e.op) || e.category == "wait") continue;
      const double a = e.start_us - t0;
      const double b = a + e.duration_us;
      rep.timeline.push_back({static_cast<int>(r), step++, {e.op, e.stage, e.micro_batch}, a, b});
      rep.busy[r] += e.duration_us;
      rep.makespan = std::max(rep.makespan, b);
      if (e.op == op_kind::forward) {
        rep.peak_activations[r] = std::max(rep.peak_activations[r], ++live);
      } else if (e.op == op_kind::backward || e.op == op_kind::backward_weight) {
        --live;
      }
    }
  }
  double busy = 0;
  for (double b : rep.busy) busy += b;
  rep.bubble_fraction =
      rep.makespan > 0 ? 1.0 - busy / (static_cast<double>(s.ranks()) * rep.makespan) : 0.0;
  return rep;
}

void write_chrome_trace(const std::string& path, const communicator& comm,
                        const std::vector<trace_event>& events, int pid_offset) {
  // A common time origin: the earliest event of any rank (steady_clock is
  // one system-wide clock on Linux, so MPI processes on one node agree).
  double t0 = std::numeric_limits<double>::max();
  for (const auto& e : events) t0 = std::min(t0, e.start_us);
  allreduce(comm, std::span<double>(&t0, 1), min);
  if (t0 == std::numeric_limits<double>::max()) t0 = 0;
  std::string mine;
  bool first = true;
  append_events(mine, events, comm.rank() + pid_offset, t0, first);
  // Gather the text on rank 0: a length, then the bytes.
  constexpr int tag = max_user_tag;
  if (comm.rank() != 0) {
    const auto n = static_cast<std::int64_t>(mine.size());
    comm.send(std::span<const std::int64_t>(&n, 1), 0, tag);
    std::vector<std::uint8_t> bytes(mine.begin(), mine.end());
    comm.send(std::span<const std::uint8_t>(bytes), 0, tag);
    return;
  }
  std::string body = mine;
  for (int r = 1; r < comm.size(); ++r) {
    std::int64_t n = 0;
    comm.recv(std::span<std::int64_t>(&n, 1), r, tag);
    std::vector<std::uint8_t> bytes(static_cast<std::size_t>(n));
    comm.recv(std::span<std::uint8_t>(bytes), r, tag);
    if (n == 0) continue;
    if (!body.empty()) body += ",";
    body.append(bytes.begin(), bytes.end());
  }
  try {
    detail::write_file_atomically(path, finish_json(body, comm.size(), pid_offset));
  } catch (const detail::file_write_error& e) {
    throw error(fmt::format("pipeline::write_chrome_trace on rank 0: {}", e.what()));
  }
}

}  // namespace ringflow::pipeline
