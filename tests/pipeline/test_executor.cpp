// The executor on threads: for every schedule kind, stage gradients and the
// loss equal single-process ones (uneven stages, fewer micro-batches than
// stages), data x pipeline averaging, forward-only passes, traces, errors.
#include <fmt/format.h>

#include <cmath>
#include <map>
#include <mutex>
#include <random>
#include <string>
#include <vector>

#include "ringflow/ad/autodiff.hpp"
#include "ringflow/backends/local.hpp"
#include "ringflow/core/error.hpp"
#include "ringflow/pipeline/executor.hpp"
#include "ringflow/pipeline/stages.hpp"
#include "support/catch.hpp"

using namespace ringflow;
namespace ad = ringflow::ad;
namespace pl = ringflow::pipeline;

namespace {

constexpr ad::index features = 6;
// 9 layers: linear, relu, linear, relu, linear, relu, linear, relu, linear.
const std::vector<ad::index> widths = {features, 8, 7, 5, 6, 4};
constexpr std::uint64_t seed = 7;

struct batch {
  std::vector<float> x;
  std::vector<int> y;
};

batch make_batch(ad::index rows, std::uint64_t s) {
  std::mt19937_64 rng(s);
  std::normal_distribution<float> normal;
  batch b;
  for (ad::index i = 0; i < rows * features; ++i) b.x.push_back(normal(rng));
  for (ad::index i = 0; i < rows; ++i) b.y.push_back(static_cast<int>(rng() % 4));
  return b;
}

using grads = std::map<std::string, std::vector<float>>;

// Single-process gradients of the batch-mean loss.
grads reference(const batch& b, double& loss) {
  ad::mlp model(widths, ad::activation::relu, seed);
  auto params = model.parameters();
  const auto rows = static_cast<ad::index>(b.y.size());
  auto out = model(ad::tensor::from_data(b.x.data(), {rows, features}));
  auto l = ad::softmax_cross_entropy(out, b.y);
  l.backward();
  loss = l.item();
  grads g;
  for (const auto& p : params) {
    const auto d = p.tensor.grad_data();
    g[p.name].assign(d.begin(), d.end());
  }
  return g;
}

// Largest |a - b| over the parameters of `got` (each must exist in `want`).
double max_diff(const grads& got, const grads& want, std::string& worst) {
  double m = 0;
  for (const auto& [name, g] : got) {
    const auto it = want.find(name);
    if (it == want.end() || it->second.size() != g.size()) {
      worst = name + " (missing or wrong size)";
      return 1e9;
    }
    for (std::size_t i = 0; i < g.size(); ++i) {
      const double d = std::abs(static_cast<double>(g[i]) - it->second[i]);
      if (d > m) {
        m = d;
        worst = name;
      }
    }
  }
  return m;
}

struct outcome {
  grads g;
  double loss = 0;
  std::vector<std::string> errors;
};

// Runs `s` over s.ranks() threads with the model cut into `counts` layers
// per stage; returns every rank's gradients (merged by name) and the loss.
outcome run_pipeline(const pl::schedule& s, const std::vector<std::size_t>& counts,
                     const batch& b) {
  outcome o;
  std::mutex m;
  const auto rows = static_cast<ad::index>(b.y.size());
  local::run(s.ranks(), [&](communicator& c) {
    try {
      ad::mlp model(widths, ad::activation::relu, seed);
      pl::sequential_stages stages(model, s, c.rank(), counts, features);
      stages.set_batch(b.x.data(), rows, b.y);
      pl::executor ex(c, s);
      ex.run(stages);
      // Twice: gradients are zeroed per run, not accumulated across runs.
      ex.run(stages);
      std::lock_guard lock(m);
      for (const auto& p : stages.parameters()) {
        const auto d = p.tensor.grad_data();
        o.g[p.name].assign(d.begin(), d.end());
      }
      o.loss += stages.loss();
    } catch (const std::exception& e) {
      std::lock_guard lock(m);
      o.errors.push_back(fmt::format("rank {}: {}", c.rank(), e.what()));
      throw;
    }
  });
  return o;
}

std::vector<std::size_t> uneven_counts(int stages) {
  // Costs that make the balancer cut unevenly (the first layers are dear).
  std::vector<double> costs;
  for (std::size_t i = 0; i < 9; ++i) costs.push_back(i == 0 ? 5.0 : i % 2 == 0 ? 2.0 : 0.5);
  return pl::balance_layers(costs, stages);
}

}  // namespace

TEST_CASE("balance_layers minimizes the costliest stage", "[pipeline][executor]") {
  CHECK(pl::balance_layers(std::vector<double>{4, 1, 2, 1, 4}, 3) ==
        std::vector<std::size_t>{1, 3, 1});
  CHECK(pl::balance_layers(std::vector<double>{1, 1, 1, 1}, 4) ==
        std::vector<std::size_t>{1, 1, 1, 1});
  CHECK(pl::balance_layers(std::vector<double>{1, 1, 1, 1, 1, 1}, 2) ==
        std::vector<std::size_t>{3, 3});
  CHECK_THROWS_AS(pl::balance_layers(std::vector<double>{1, 1}, 3), usage_error);
  ad::mlp model(widths, ad::activation::relu, seed);
  const auto costs = pl::measure_layer_costs(model, features, 16, 1);
  CHECK(costs.size() == 9);
  for (double c : costs) CHECK(c >= 0);
  for (const auto& p : model.parameters()) {
    for (float g : p.tensor.grad_data()) CHECK(g == 0.0f);
  }
}

TEST_CASE("every schedule gives the single-process gradients", "[pipeline][executor]") {
  const batch b = make_batch(7, 11);
  double ref_loss = 0;
  const grads ref = reference(b, ref_loss);
  for (int p = 1; p <= 4; ++p) {
    for (int m : {1, 2, 3, 5}) {  // m < p included; 7 rows make uneven micro-batches
      for (bool split : {false, true}) {
        const pl::generate_options o{.split_backward = split};
        std::vector<pl::schedule> plans = {pl::gpipe(p, m, o), pl::one_f_one_b(p, m, o)};
        if (2 * p <= 9) plans.push_back(pl::interleaved_1f1b(p, 2, m, o));
        for (const auto& s : plans) {
          INFO(s.name << " p=" << p << " m=" << m << " split=" << split);
          const auto counts = uneven_counts(s.stages());
          const outcome got = run_pipeline(s, counts, b);
          for (const auto& e : got.errors) UNSCOPED_INFO(e);
          REQUIRE(got.errors.empty());
          CHECK(got.g.size() == ref.size());
          std::string worst;
          const double d = max_diff(got.g, ref, worst);
          INFO("worst parameter " << worst);
          CHECK(d < 1e-5);
          CHECK(std::abs(got.loss - ref_loss) < 1e-5);
        }
      }
    }
  }
}

TEST_CASE("a hand-written schedule and given stage sizes", "[pipeline][executor]") {
  const batch b = make_batch(4, 3);
  double ref_loss = 0;
  const grads ref = reference(b, ref_loss);
  const auto s = pl::parse_schedule(
      "schedule hand micro_batches 2\n"
      "rank 0: F0.0 SA0.0 F0.1 SA0.1 RG0.1 B0.1 RG0.0 BI0.0 BW0.0 REDUCE STEP\n"
      "rank 1: RA1.0 F1.0 RA1.1 F1.1 B1.1 SG1.1 B1.0 SG1.0 REDUCE STEP\n");
  const auto got = run_pipeline(s, {8, 1}, b);
  REQUIRE(got.errors.empty());
  std::string worst;
  CHECK(max_diff(got.g, ref, worst) < 1e-5);
  CHECK(got.g.size() == ref.size());
}

TEST_CASE("data x pipeline: 2 pipelines x 2 stages average the stage gradients",
          "[pipeline][executor]") {
  const batch b = make_batch(8, 5);
  double ref_loss = 0;
  const grads ref = reference(b, ref_loss);  // mean over all 8 rows
  const auto s = pl::one_f_one_b(2, 2);
  outcome o;
  std::mutex m;
  int step_calls = 0;
  local::run(4, [&](communicator& world) {
    const auto g = pl::make_grid(world, 2);
    ad::mlp model(widths, ad::activation::relu, seed);
    pl::sequential_stages stages(model, s, g.pipeline.rank(), {5, 4}, features);
    // Pipeline i takes rows [4i, 4i + 4).
    const auto off = static_cast<std::size_t>(g.pipeline_index * 4);
    stages.set_batch(b.x.data() + off * features, 4, std::span<const int>(b.y).subspan(off, 4));
    stages.set_data_parallel(g.data);
    stages.set_optimizer_step([&] {
      std::lock_guard lock(m);
      ++step_calls;
    });
    pl::executor ex(g.pipeline, s);
    ex.run(stages);
    std::lock_guard lock(m);
    if (g.pipeline_index == 1) {
      for (const auto& p : stages.parameters()) {
        const auto d = p.tensor.grad_data();
        o.g[p.name].assign(d.begin(), d.end());
      }
    }
  });
  CHECK(step_calls == 4);
  CHECK(o.g.size() == ref.size());
  std::string worst;
  CHECK(max_diff(o.g, ref, worst) < 1e-5);
}

TEST_CASE("forward-only pass returns the model output on the last stage", "[pipeline][executor]") {
  const batch b = make_batch(9, 8);
  ad::mlp ref_model(widths, ad::activation::relu, seed);
  ad::matrix<float> want;
  {
    ad::no_grad guard;
    want = ref_model(ad::tensor::from_data(b.x.data(), {9, features})).value();
  }
  const auto train = pl::interleaved_1f1b(2, 2, 3);
  const auto infer = pl::forward_pass(train.stage_rank, 2, 4);
  ad::matrix<float> got;
  std::mutex m;
  local::run(2, [&](communicator& c) {
    ad::mlp model(widths, ad::activation::relu, seed);
    pl::sequential_stages stages(model, train, c.rank(), {3, 2, 2, 2}, features);
    stages.set_batch(b.x.data(), 9);
    pl::executor ex(c, infer);
    ex.run(stages);
    std::lock_guard lock(m);
    if (c.rank() == 1) got = stages.outputs();
  });
  REQUIRE(got.rows() == 9);
  CHECK((got - want).cwiseAbs().maxCoeff() < 1e-6);
}

TEST_CASE("executor traces, peak activations and errors", "[pipeline][executor]") {
  const batch b = make_batch(8, 9);
  std::mutex m;
  std::vector<std::vector<pl::trace_event>> events(2);
  std::vector<pl::run_stats> stats(2);
  std::vector<std::size_t> bytes(2);
  for (const auto& s : {pl::gpipe(2, 4), pl::one_f_one_b(2, 4)}) {
    local::run(2, [&](communicator& c) {
      ad::mlp model(widths, ad::activation::relu, seed);
      pl::sequential_stages stages(model, s, c.rank(), {5, 4}, features);
      stages.set_batch(b.x.data(), 8, b.y);
      pl::executor ex(c, s, {.trace = true});
      const auto st = ex.run(stages);
      std::lock_guard lock(m);
      events[static_cast<std::size_t>(c.rank())] = ex.events();
      stats[static_cast<std::size_t>(c.rank())] = st;
      bytes[static_cast<std::size_t>(c.rank())] = stages.peak_activation_bytes();
    });
    INFO(s.name);
    if (s.name == "gpipe") {
      CHECK(stats[0].peak_activations == 4);
      CHECK(stats[1].peak_activations == 4);
    } else {
      CHECK(stats[0].peak_activations == 2);
      CHECK(stats[1].peak_activations == 1);
    }
    CHECK(bytes[0] > 0);
    const auto measured = pl::measured_report(s, events);
    std::size_t computes = 0;
    for (const auto& prog : s.programs) {
      for (const auto& ins : prog) computes += pl::is_compute(ins.op) ? 1 : 0;
    }
    CHECK(measured.timeline.size() == computes);
    CHECK(measured.bubble_fraction >= 0.0);
    CHECK(measured.bubble_fraction < 1.0);
    CHECK(measured.peak_activations[0] == stats[0].peak_activations);
    CHECK(pl::to_svg(s, measured).find("</svg>") != std::string::npos);
    const auto json = pl::chrome_trace_json(events);
    CHECK(json.find("\"traceEvents\"") != std::string::npos);
    CHECK(json.find("\"ph\":\"X\"") != std::string::npos);
    CHECK(json.find("\"name\":\"F1.3\"") != std::string::npos);
  }

  // A broken schedule or a wrong communicator size is refused before any message.
  auto broken = pl::gpipe(2, 2);
  broken.programs[1].erase(broken.programs[1].begin());
  std::vector<std::string> errors(2);
  CHECK_THROWS_AS(local::run(2,
                             [&](communicator& c) {
                               try {
                                 pl::executor ex(c, broken);
                               } catch (const usage_error& e) {
                                 std::lock_guard lock(m);
                                 errors[static_cast<std::size_t>(c.rank())] = e.what();
                                 throw;
                               }
                             }),
                  usage_error);
  CHECK((errors[0].find("RA1.0 is missing") != std::string::npos ||
         errors[1].find("RA1.0 is missing") != std::string::npos));
  CHECK_THROWS_AS(local::run(3, [&](communicator& c) { pl::executor ex(c, pl::gpipe(2, 2)); }),
                  usage_error);
  // Fewer rows than micro-batches.
  CHECK_THROWS_AS(local::run(1,
                             [&](communicator& c) {
                               ad::mlp model(widths, ad::activation::relu, seed);
                               const auto s = pl::gpipe(1, 4);
                               pl::sequential_stages stages(model, s, 0, {9}, features);
                               stages.set_batch(b.x.data(), 3, std::span<const int>(b.y).first(3));
                               pl::executor(c, s).run(stages);
                             }),
                  usage_error);
  ad::mlp model(widths, ad::activation::relu, seed);
  CHECK_THROWS_AS(pl::sequential_stages(model, pl::gpipe(2, 1), 0, {4, 4}, features), usage_error);
}
