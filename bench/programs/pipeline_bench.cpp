// pipeline_bench: measured bubble and activation memory of GPipe, 1F1B and interleaved 1F1B on
// threads.
//
//   build/bin/pipeline_bench [--ranks 4] [--micro-batches 1,2,4,8,16] [--forward-us 2000]
//                            [--backward-us 4000] [--chunks 2] [--reps 3] [--activation-kib 1024]
//   build/bin/pipeline_bench --svg docs/img      # the schedule pictures, and their ASCII grids
//
// Stages are synthetic: a forward sleeps --forward-us, a backward --backward-us
// (an interleaved chunk 1/chunks of that), so the figures do not depend on free
// cores. Each rank is a thread of the local backend; activations are real
// heap buffers of --activation-kib held from forward to backward. Prints one
// Markdown table (medians over --reps runs, the schedules interleaved per rep).
#include <fmt/format.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "tool_flags.hpp"
#include <ringflow/backends/local.hpp>
#include <ringflow/pipeline/executor.hpp>
#include <ringflow/pipeline/schedule.hpp>
#include <ringflow/pipeline/verify.hpp>

namespace pl = ringflow::pipeline;

namespace {

struct options {
  int ranks = 4;
  std::vector<int> micro_batches = {1, 2, 4, 8, 16};
  double forward_us = 2000;
  double backward_us = 4000;
  int chunks = 2;
  int reps = 3;
  std::size_t activation_kib = 1024;
  std::string svg_dir;
};

// Sleeps for the stage's cost and holds a real activation buffer from
// forward to the end of backward, so the peak memory is measured, not assumed.
class sleep_runner : public pl::stage_runner {
 public:
  sleep_runner(double f_us, double b_us, std::size_t activation_bytes)
      : f_us_(f_us), b_us_(b_us), activation_bytes_(activation_bytes) {}

  std::size_t input_elements(int, int) override { return 64; }
  std::size_t output_elements(int, int) override { return 64; }
  void forward(int stage, int mb, std::span<const float>) override {
    sleep(f_us_);
    held_[{stage, mb}].assign(activation_bytes_, 1);
    live_ += activation_bytes_;
    peak_ = std::max(peak_, live_);
  }
  std::span<const float> output(int, int) override { return message_; }
  void backward(int stage, int mb, std::span<const float>, bool defer) override {
    sleep(defer ? b_us_ / 2 : b_us_);
    if (!defer) drop(stage, mb);
  }
  void backward_weight(int stage, int mb) override {
    sleep(b_us_ / 2);
    drop(stage, mb);
  }
  std::span<const float> input_grad(int, int) override { return message_; }
  std::size_t peak_bytes() const { return peak_; }

 private:
  static void sleep(double us) {
    std::this_thread::sleep_for(std::chrono::microseconds(static_cast<long long>(us)));
  }
  void drop(int stage, int mb) {
    held_.erase({stage, mb});
    live_ -= activation_bytes_;
  }
  double f_us_, b_us_;
  std::size_t activation_bytes_;
  std::vector<float> message_ = std::vector<float>(64, 0.5f);
  std::map<std::pair<int, int>, std::vector<char>> held_;
  std::size_t live_ = 0, peak_ = 0;
};

struct measurement {
  double bubble = 0;                    // 1 - sum(compute) / (ranks * slowest rank's wall time)
  double seconds = 0;                   // wall time of the step
  std::vector<std::size_t> peak_bytes;  // per rank
};

measurement measure(const pl::schedule& s, double f_us, double b_us, std::size_t act_bytes) {
  const int p = s.ranks();
  std::vector<pl::run_stats> stats(static_cast<std::size_t>(p));
  std::vector<std::size_t> peaks(static_cast<std::size_t>(p));
  ringflow::local::run(p, [&](ringflow::communicator& c) {
    sleep_runner runner(f_us, b_us, act_bytes);
    pl::executor ex(c, s);
    const auto st = ex.run(runner);
    stats[static_cast<std::size_t>(c.rank())] = st;
    peaks[static_cast<std::size_t>(c.rank())] = runner.peak_bytes();
  });
  measurement m;
  double busy = 0;
  for (const auto& st : stats) {
    busy += st.compute_seconds;
    m.seconds = std::max(m.seconds, st.seconds);
  }
  m.bubble = 1.0 - busy / (static_cast<double>(p) * m.seconds);
  m.peak_bytes = peaks;
  return m;
}

// Writes docs/img/pipeline_<kind>.svg for p ranks and m micro-batches
// (forward 1, backward 2 per stage; an interleaved chunk half of that) and
// prints each schedule's ASCII grid.
int write_pictures(const options& o) {
  const int p = o.ranks;
  const int m = o.micro_batches.back();
  struct kind {
    const char* file;
    pl::schedule s;
    double scale;
  };
  const kind kinds[] = {{"gpipe", pl::gpipe(p, m), 1.0},
                        {"1f1b", pl::one_f_one_b(p, m), 1.0},
                        {"interleaved", pl::interleaved_1f1b(p, o.chunks, m), 1.0 / o.chunks}};
  for (const auto& k : kinds) {
    const auto costs = pl::stage_costs::uniform(k.s.stages(), k.scale, 2 * k.scale);
    const auto report = pl::verify(k.s, costs);
    const std::string title =
        k.s.stages() > p ? fmt::format("interleaved 1F1B: {} ranks x {} chunks, {} micro-batches",
                                       p, o.chunks, m)
                         : fmt::format("{}: {} ranks, {} micro-batches",
                                       k.s.name == "gpipe" ? "GPipe" : "1F1B", p, m);
    const std::string predicted = title + " (predicted: forward 1, backward 2 per stage)";
    const std::string path = fmt::format("{}/pipeline_{}.svg", o.svg_dir, k.file);
    std::FILE* f = std::fopen(path.c_str(), "w");
    if (f == nullptr) {
      std::fprintf(stderr, "pipeline_bench: cannot write %s\n", path.c_str());
      return 1;
    }
    const std::string svg = pl::to_svg(k.s, report, predicted);
    std::fwrite(svg.data(), 1, svg.size(), f);
    std::fclose(f);
    fmt::print("{}\n{}\n", path, pl::ascii_grid(k.s, report));
  }
  // The same 1F1B measured: threads sleeping the forward and backward times.
  const auto s = pl::one_f_one_b(p, m);
  std::vector<std::vector<pl::trace_event>> events(static_cast<std::size_t>(p));
  ringflow::local::run(p, [&](ringflow::communicator& c) {
    sleep_runner runner(o.forward_us, o.backward_us, 1024);
    pl::executor ex(c, s, {.trace = true});
    ex.run(runner);
    events[static_cast<std::size_t>(c.rank())] = ex.events();
  });
  const auto measured = pl::measured_report(s, events);
  const std::string path = fmt::format("{}/pipeline_1f1b_measured.svg", o.svg_dir);
  std::FILE* f = std::fopen(path.c_str(), "w");
  if (f == nullptr) {
    std::fprintf(stderr, "pipeline_bench: cannot write %s\n", path.c_str());
    return 1;
  }
  const std::string svg = pl::to_svg(
      s, measured,
      fmt::format(
          "1F1B: {} ranks, {} micro-batches (measured on threads: sleeps of {:.0f} / {:.0f} us)", p,
          m, o.forward_us, o.backward_us));
  std::fwrite(svg.data(), 1, svg.size(), f);
  std::fclose(f);
  fmt::print("{}\n{}\n", path, pl::ascii_grid(s, measured));
  return 0;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

std::string peaks_mib(const std::vector<std::size_t>& peaks) {
  std::string out;
  for (auto b : peaks) out += fmt::format("{}{:.0f}", out.empty() ? "" : "/", b / 1048576.0);
  return out;
}

}  // namespace

int main(int argc, char** argv) try {
  options o;
  try {
    namespace tf = ringflow::tool_flags;
    tf::reader flags(argc, argv);
    while (flags.next()) {
      if (flags.is("--ranks"))
        o.ranks = static_cast<int>(flags.integer(1, 64));
      else if (flags.is("--micro-batches")) {
        o.micro_batches.clear();
        for (long long m : flags.integers(1, 1024, 64))
          o.micro_batches.push_back(static_cast<int>(m));
      } else if (flags.is("--forward-us"))
        o.forward_us = flags.number(0, 1e6, /*lo_open=*/true);
      else if (flags.is("--backward-us"))
        o.backward_us = flags.number(0, 1e6, /*lo_open=*/true);
      else if (flags.is("--chunks"))
        o.chunks = static_cast<int>(flags.integer(1, 64));
      else if (flags.is("--reps"))
        o.reps = static_cast<int>(flags.integer(1, 1000));
      else if (flags.is("--svg"))
        o.svg_dir = flags.text();
      else if (flags.is("--activation-kib"))
        o.activation_kib = flags.count(0, 65536);
      else if (flags.is("--help", "-h")) {
        std::printf(
            "pipeline_bench [--ranks P] [--micro-batches A,B,..] [--forward-us F] "
            "[--backward-us B] [--chunks V] [--reps R] [--activation-kib K] [--svg DIR]\n"
            "  --svg DIR   write DIR/pipeline_{gpipe,1f1b,interleaved}.svg for --ranks and the\n"
            "              last --micro-batches count, print their ASCII grids, and exit\n"
            "Ranges: --ranks [1, 64], --micro-batches up to 64 values in [1, 1024], --forward-us "
            "and\n"
            "--backward-us (0, 1e6], --chunks [1, 64], --reps [1, 1000], --activation-kib [0, "
            "65536].\n"
            "A bad value exits with status 2.\n");
        return 0;
      } else {
        flags.unknown();
      }
    }
  } catch (const ringflow::tool_flags::bad_flag& e) {
    return ringflow::tool_flags::report("pipeline_bench", e);
  }

  if (!o.svg_dir.empty()) return write_pictures(o);
  const int p = o.ranks;
  const std::size_t act = o.activation_kib * 1024;
  fmt::print(
      "pipeline_bench: {} ranks (threads), forward {:.0f} us, backward {:.0f} us per stage "
      "(interleaved: {} chunks of 1/{} each), activation {} KiB per micro-batch and stage, "
      "median of {} reps\n\n",
      p, o.forward_us, o.backward_us, o.chunks, o.chunks, o.activation_kib, o.reps);
  fmt::print(
      "| m | (p-1)/(m+p-1) | GPipe measured | 1F1B measured | interleaved v={} predicted | "
      "interleaved measured | interleaved / 1F1B | step ms GPipe / 1F1B / interl. | peak MiB "
      "per rank GPipe | peak MiB per rank 1F1B |\n",
      o.chunks);
  fmt::print("|---|---|---|---|---|---|---|---|---|---|\n");
  for (int m : o.micro_batches) {
    const auto g = pl::gpipe(p, m);
    const auto f = pl::one_f_one_b(p, m);
    const auto v = pl::interleaved_1f1b(p, o.chunks, m);
    const double cf = o.forward_us / o.chunks, cb = o.backward_us / o.chunks;
    const double predicted_v =
        pl::verify(v, pl::stage_costs::uniform(v.stages(), cf, cb)).bubble_fraction;
    std::vector<double> bg, bf, bv, tg, tf, tv;
    std::vector<std::size_t> pg, pf;
    for (int rep = 0; rep < o.reps; ++rep) {
      // Interleaved per rep so drift in machine load hits every schedule alike.
      const auto mg = measure(g, o.forward_us, o.backward_us, act);
      const auto mf = measure(f, o.forward_us, o.backward_us, act);
      const auto mv = measure(v, cf, cb, act);
      bg.push_back(mg.bubble);
      bf.push_back(mf.bubble);
      bv.push_back(mv.bubble);
      tg.push_back(mg.seconds * 1e3);
      tf.push_back(mf.seconds * 1e3);
      tv.push_back(mv.seconds * 1e3);
      pg = mg.peak_bytes;
      pf = mf.peak_bytes;
    }
    fmt::print(
        "| {} | {:.3f} | {:.3f} | {:.3f} | {:.3f} | {:.3f} | {:.2f} | {:.0f} / {:.0f} / {:.0f} | "
        "{} | {} |\n",
        m, pl::textbook_bubble(p, m), median(bg), median(bf), predicted_v, median(bv),
        median(bv) / median(bf), median(tg), median(tf), median(tv), peaks_mib(pg), peaks_mib(pf));
    std::fflush(stdout);
  }
  return 0;
} catch (const ringflow::error& e) {
  std::fprintf(stderr, "pipeline_bench: %s\n", e.what());
  return 1;
}
