// Pipeline schedules over MPI (run under mpirun -np 1..5): every schedule
// gives each stage the single-process gradients, and a data x pipeline grid
// averages them across replicas.
#include <fmt/format.h>

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "ringflow/ad/autodiff.hpp"
#include "ringflow/backends/mpi.hpp"
#include "ringflow/pipeline/executor.hpp"
#include "ringflow/pipeline/stages.hpp"
#include "support/catch.hpp"

using namespace ringflow;
namespace ad = ringflow::ad;
namespace pl = ringflow::pipeline;

namespace {

constexpr ad::index features = 5;
const std::vector<ad::index> widths = {features, 9, 7, 6, 8, 3};  // 9 layers
constexpr std::uint64_t seed = 3;

struct data {
  std::vector<float> x;
  std::vector<int> y;
};

data make_data(ad::index rows) {
  std::mt19937_64 rng(99);
  std::normal_distribution<float> normal;
  data d;
  for (ad::index i = 0; i < rows * features; ++i) d.x.push_back(normal(rng));
  for (ad::index i = 0; i < rows; ++i) d.y.push_back(static_cast<int>(rng() % 3));
  return d;
}

// Checks this rank's stage gradients against the single-process gradients
// of rows [first, first + rows * replicas) (the mean over all replicas).
void check_against_reference(const pl::sequential_stages& stages, const data& d, ad::index rows,
                             std::vector<std::string>& failures, const std::string& what) {
  ad::mlp ref(widths, ad::activation::relu, seed);
  auto params = ref.parameters();
  auto loss =
      ad::softmax_cross_entropy(ref(ad::tensor::from_data(d.x.data(), {rows, features})),
                                std::span<const int>(d.y).first(static_cast<std::size_t>(rows)));
  loss.backward();
  for (const auto& p : stages.parameters()) {
    const auto want = params.at(p.name).tensor.grad_data();
    const auto got = p.tensor.grad_data();
    for (std::size_t i = 0; i < got.size(); ++i) {
      if (std::abs(got[i] - want[i]) > 1e-5f) {
        failures.push_back(fmt::format("{}: {}[{}] = {} but single-process gives {}", what, p.name,
                                       i, got[i], want[i]));
        break;
      }
    }
  }
}

}  // namespace

TEST_CASE("mpi: every schedule over all ranks gives single-process gradients", "[mpi][pipeline]") {
  auto world = mpi::world();
  const int p = world.size();
  const data d = make_data(10);
  std::vector<std::string> failures;
  for (int m : {1, 3, 4}) {
    std::vector<pl::schedule> plans = {pl::gpipe(p, m),
                                       pl::one_f_one_b(p, m, {.split_backward = true})};
    if (2 * p <= 9) plans.push_back(pl::interleaved_1f1b(p, 2, m));
    for (const auto& s : plans) {
      ad::mlp model(widths, ad::activation::relu, seed);
      std::vector<double> costs(9, 1.0);
      costs[0] = 3.0;  // uneven stages
      pl::sequential_stages stages(model, s, world.rank(), pl::balance_layers(costs, s.stages()),
                                   features);
      stages.set_batch(d.x.data(), 10, d.y);
      pl::executor ex(world, s);
      ex.run(stages);
      check_against_reference(stages, d, 10, failures,
                              fmt::format("{} m={} rank {}", s.name, m, world.rank()));
    }
  }
  for (const auto& f : failures) UNSCOPED_INFO(f);
  CHECK(failures.empty());
}

TEST_CASE("mpi: data x pipeline grid averages each stage over its replicas", "[mpi][pipeline]") {
  auto world = mpi::world();
  const int n = world.size();
  // Pipelines of 2 stages where the size allows, else of every rank, and
  // (always) pure data parallelism: pipelines of 1 stage.
  std::vector<int> depths = {1, n % 2 == 0 ? 2 : n};
  const data d = make_data(6 * n);
  std::vector<std::string> failures;
  for (int depth : depths) {
    const auto g = pl::make_grid(world, depth);
    const auto s = pl::one_f_one_b(depth, 2);
    ad::mlp model(widths, ad::activation::relu, seed);
    pl::sequential_stages stages(model, s, g.pipeline.rank(),
                                 pl::balance_layers(std::vector<double>(9, 1.0), depth), features);
    // Replica i takes 6 rows starting at 6i; together they cover 6 * pipelines rows.
    const auto off = static_cast<std::size_t>(6 * g.pipeline_index);
    stages.set_batch(d.x.data() + off * features, 6, std::span<const int>(d.y).subspan(off, 6));
    stages.set_data_parallel(g.data);
    pl::executor ex(g.pipeline, s);
    ex.run(stages);
    check_against_reference(stages, d, 6 * g.pipelines, failures,
                            fmt::format("grid depth {} rank {}", depth, world.rank()));
  }
  for (const auto& f : failures) UNSCOPED_INFO(f);
  CHECK(failures.empty());
}

TEST_CASE("mpi: Chrome trace of a run", "[mpi][pipeline]") {
  auto world = mpi::world();
  const auto s = pl::gpipe(world.size(), 2);
  const data d = make_data(4);
  ad::mlp model(widths, ad::activation::relu, seed);
  pl::sequential_stages stages(model, s, world.rank(),
                               pl::balance_layers(std::vector<double>(9, 1.0), world.size()),
                               features);
  stages.set_batch(d.x.data(), 4, d.y);
  pl::executor ex(world, s, {.trace = true});
  ex.run(stages);
  const std::string path = fmt::format("test_mpi_pipeline_trace_np{}.json", world.size());
  pl::write_chrome_trace(path, world, ex.events());
  if (world.rank() == 0) {
    std::FILE* f = std::fopen(path.c_str(), "r");
    REQUIRE(f != nullptr);
    std::string text;
    char buf[4096];
    for (std::size_t n; (n = std::fread(buf, 1, sizeof buf, f)) > 0;) text.append(buf, n);
    std::fclose(f);
    std::remove(path.c_str());
    CHECK(text.find("\"traceEvents\"") != std::string::npos);
    CHECK(text.find(fmt::format("\"pid\":{}", world.size() - 1)) != std::string::npos);
    CHECK(text.find("\"ph\":\"X\"") != std::string::npos);
  }
}
