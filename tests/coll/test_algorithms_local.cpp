// Every allreduce algorithm on the thread backend (1..8 ranks), emulated
// nodes for the hierarchical one, the cost model's choice, the registry.
#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

#include "ringflow/backends/local.hpp"
#include "ringflow/coll/algorithms.hpp"
#include "ringflow/coll/cost_model.hpp"
#include "ringflow/coll/explain.hpp"
#include "support/catch.hpp"
#include "support/coll_checks.hpp"
#include "support/collect.hpp"

using namespace ringflow;
using ringflow::testing::failures;
using ringflow::testing::require_none;
using ringflow::testing::run_collecting;
using ringflow::testing::scoped_env;

TEST_CASE("every allreduce algorithm matches the serial reference on 1..8 ranks",
          "[coll][local][algorithms]") {
  for (algo a : testing::transport_algorithms()) {
    for (int p = 1; p <= 8; ++p) {
      INFO(algo_name(a) << " on " << p << " ranks");
      require_none(run_collecting(p, [a](communicator& c, failures& f) {
        testing::check_algorithm(c, a, f);
        testing::check_signed_zero_agreement(c, a, f);
      }));
    }
  }
}

TEST_CASE("hierarchical allreduce on emulated nodes, equal and unequal sizes",
          "[coll][local][algorithms]") {
  for (const char* node_size : {"1", "2", "3"}) {
    scoped_env env("RINGFLOW_NODE_SIZE", node_size);
    for (int p = 2; p <= 8; ++p) {
      INFO("RINGFLOW_NODE_SIZE=" << node_size << ", " << p << " ranks");
      require_none(run_collecting(p, [](communicator& c, failures& f) {
        testing::check_algorithm_op<float>(c, algo::hierarchical, sum, f);
        testing::check_algorithm_op<std::int32_t>(c, algo::hierarchical, avg, f);
        testing::check_algorithm_all_ops_one_count<half>(c, algo::hierarchical, 1000, f);
        testing::check_signed_zero_agreement(c, algo::hierarchical, f);
      }));
    }
  }
}

TEST_CASE("large allreduce through every algorithm: identical bits on every rank and run",
          "[coll][local][algorithms]") {
  scoped_env env("RINGFLOW_NODE_SIZE", "2");
  // 3 ranks: the fold of the power-of-two algorithms, unequal nodes; 4 ranks
  // for the power-of-two path itself (the small counts cover the rest).
  for (algo a : testing::transport_algorithms()) {
    INFO(algo_name(a) << " on 3 ranks");
    require_none(run_collecting(3, [a](communicator& c, failures& f) {
      testing::check_large_bitwise_algo(c, a, 1000003, f);
      if (a == algo::hierarchical) {  // unequal emulated nodes, avg divided once
        testing::check_allreduce<std::int32_t>(c, 1000003, avg, true, coll_options{a, 0}, f);
      }
    }));
  }
  for (algo a : {algo::recursive_doubling, algo::halving_doubling}) {
    INFO(algo_name(a) << " on 4 ranks");
    require_none(run_collecting(4, [a](communicator& c, failures& f) {
      testing::check_large_bitwise_algo(c, a, 1000003, f);
    }));
  }
}

TEST_CASE("the algorithm table: one row per algorithm, names and aliases unique",
          "[coll][options]") {
  const auto rows = allreduce_algorithms();
  REQUIRE(rows.size() == algo_count);
  std::vector<std::string> names;
  for (std::size_t v = 0; v < algo_count; ++v) {
    const algo a = static_cast<algo>(v);
    const algorithm_info& info = algorithm_info_of(a);
    CHECK(info.id == a);
    CHECK(algo_name(a) == info.name);
    CHECK_FALSE(info.label.empty());
    names.emplace_back(info.name);
    for (std::string_view alias : info.aliases) {
      if (!alias.empty()) names.emplace_back(alias);
    }
    // A row automatic may pick has a cost (its own, or one a backend
    // registers: shm), and a row with a runner is one the tests run.
    if (info.automatic && info.cost == nullptr) CHECK(a == algo::shm);
    if (info.run == nullptr) CHECK((a == algo::shm || a == algo::native || a == algo::automatic));
  }
  std::sort(names.begin(), names.end());
  CHECK(std::adjacent_find(names.begin(), names.end()) == names.end());
  CHECK(algo_name(static_cast<algo>(algo_count)) == "unknown");
  // The cost model's candidates are the table's automatic rows, in its order.
  const explanation e =
      choose_algorithm(builtin_cost_model(), cluster_shape{4, 1, 4, 0, false}, 4096);
  for (const auto& c : e.candidates) CHECK(algorithm_info_of(c.algorithm).automatic);
  // The tests and the bench run every row with a runner.
  const auto tested = testing::transport_algorithms();
  for (const algorithm_info& info : rows) {
    if (info.run != nullptr && info.id != algo::ring) {
      CHECK(std::find(tested.begin(), tested.end(), info.id) != tested.end());
    }
  }
}

TEST_CASE("algorithm names round-trip through parse_algo", "[coll][options]") {
  for (std::size_t v = 0; v < algo_count; ++v) {
    const algo a = static_cast<algo>(v);
    CHECK(parse_algo(algo_name(a)) == a);
    for (std::string_view alias : algorithm_info_of(a).aliases) {
      if (!alias.empty()) CHECK(parse_algo(alias) == a);
    }
  }
  CHECK(parse_algo("automatic") == algo::automatic);
  CHECK(parse_algo("rd") == algo::recursive_doubling);
  CHECK(parse_algo("hd") == algo::halving_doubling);
  CHECK_THROWS_AS(parse_algo("butterfly"), usage_error);
}

TEST_CASE("reduce_scatter and allgather refuse allreduce-only algorithms", "[coll][errors]") {
  auto comms = local::make_group(1);
  std::vector<float> a(4, 1.0f), b(4);
  CHECK_THROWS_AS(reduce_scatter(comms[0], std::span<const float>(a), std::span<float>(b), sum,
                                 coll_options{algo::tree, 0}),
                  not_supported_error);
  CHECK_THROWS_AS(allgather(comms[0], std::span<const float>(a), std::span<float>(b),
                            coll_options{algo::double_tree, 0}),
                  not_supported_error);
}

namespace {
std::atomic<int> fake_shm_calls{0};
bool fake_shm(const communicator& c, void* out, const void* in, std::size_t count, dtype type,
              op_kind op) {
  if (type != dtype::f32 || op != op_kind::sum) return false;
  fake_shm_calls.fetch_add(1);
  // Stand-in: the ring does the work; the point is the dispatch.
  detail::ring_allreduce(c.raw(), static_cast<const float*>(in), static_cast<float*>(out), count,
                         sum_op{}, default_segment_bytes);
  return true;
}
}  // namespace

TEST_CASE("algo::shm runs the registered function, and says so when there is none",
          "[coll][registry]") {
  const auto saved = ext::registered_algorithm(algo::shm);
  const auto saved_cost = ext::registered_cost(algo::shm);
  ext::register_algorithm(algo::shm, nullptr);
  try {
    local::run(2, [](communicator& c) {
      std::vector<float> v(8, 1.0f);
      allreduce(c, std::span<float>(v), sum, algo::shm);
    });
    FAIL("expected not_supported_error");
  } catch (const not_supported_error& e) {
    CHECK(std::string(e.what()).find("no shared-memory allreduce is registered") !=
          std::string::npos);
  }
  ext::register_algorithm(algo::shm, &fake_shm);
  fake_shm_calls = 0;
  require_none(run_collecting(3, [](communicator& c, failures& f) {
    testing::check_allreduce<float>(c, 1000, sum, false, coll_options{algo::shm, 0}, f);
    testing::check_allreduce<float>(c, 1000, sum, true, coll_options{algo::shm, 0}, f);
  }));
  CHECK(fake_shm_calls == 6);
  CHECK_THROWS_AS(local::run(2,
                             [](communicator& c) {
                               std::vector<int> v(8, 1);
                               allreduce(c, std::span<int>(v), max, algo::shm);
                             }),
                  not_supported_error);
  ext::register_algorithm(algo::shm, saved, saved_cost);
  CHECK_THROWS_AS(ext::register_algorithm(algo::automatic, &fake_shm), usage_error);
}

TEST_CASE("the cost model picks by size and topology on synthetic parameters",
          "[coll][cost_model]") {
  cost_model m;
  m.intra = {5e-6, 1.0 / 10e9};  // 5 us, 10 GB/s
  m.inter = m.intra;
  m.gamma = 1.0 / 20e9;
  const cluster_shape flat8{8, 1, 8};
  // Latency-bound: the fewest messages.
  CHECK(choose_algorithm(m, flat8, 64).choice == algo::recursive_doubling);
  // Bandwidth-bound: the pipelined ring hides its reductions behind the
  // transfers; without reduction cost, halving-doubling moves the ring's
  // bytes in far fewer messages.
  CHECK(choose_algorithm(m, flat8, 64u << 20).choice == algo::ring);
  cost_model free_reduce = m;
  free_reduce.gamma = 0;
  CHECK(choose_algorithm(free_reduce, flat8, 64u << 20).choice == algo::halving_doubling);
  // Every candidate is listed, fastest first, and the runner-up is second.
  const explanation e = choose_algorithm(m, flat8, 1u << 20);
  REQUIRE(e.candidates.size() == 5);  // no hierarchical on one node
  // With a rendezvous threshold, recursive doubling is only a candidate
  // while the whole buffer is one small message.
  cost_model eager = m;
  eager.intra.large_alpha = 10e-6;
  eager.intra.large_from = 4096;
  CHECK(choose_algorithm(eager, flat8, 1024).choice == algo::recursive_doubling);
  CHECK(choose_algorithm(eager, flat8, 8192).choice != algo::recursive_doubling);
  CHECK(e.candidates[0].seconds <= e.candidates[1].seconds);
  CHECK(e.runner_up == e.candidates[1].algorithm);
  for (std::size_t b :
       {std::size_t{0}, std::size_t{8}, std::size_t{1} << 14, std::size_t{1} << 22}) {
    CHECK(fastest_algorithm(m, flat8, b) == choose_algorithm(m, flat8, b).choice);
  }
  // Messages from large_from bytes on pay the rendezvous alpha.
  link_cost l{1e-6, 1e-10, 5e-6, 4096};
  CHECK(l.message(4095) == Catch::Approx(1e-6 + 4095e-10));
  CHECK(l.message(4096) == Catch::Approx(5e-6 + 4096e-10));
  CHECK(e.to_string().find(std::string(algo_name(e.choice))) != std::string::npos);
  // Slow links between nodes: only 1/8 of the bytes should cross them.
  cost_model two_level = m;
  two_level.inter = {20e-6, 1.0 / 1e9};
  const cluster_shape nodes{64, 8, 8};
  CHECK(choose_algorithm(two_level, nodes, 256u << 20).choice == algo::hierarchical);
  // Hierarchical is predicted from both link kinds, and never on one node.
  CHECK(predict_seconds(algo::hierarchical, m, flat8, 1 << 20) < 0);
  // A non-power-of-two count pays the fold.
  CHECK(predict_seconds(algo::halving_doubling, m, {7, 1, 7}, 1 << 20) >
        predict_seconds(algo::halving_doubling, m, {8, 1, 8}, 1 << 20));
}

TEST_CASE("cost model files round-trip and bad ones are reported", "[coll][cost_model]") {
  cost_model m = builtin_cost_model();
  m.intra = {1.5e-6, 2.5e-10};
  m.inter = {7e-6, 1e-9};
  m.gamma = 3e-11;
  m.machine = "test box";
  const cost_model back = cost_model::from_json(m.to_json(), "test");
  CHECK(back.intra.alpha == Catch::Approx(m.intra.alpha));
  CHECK(back.intra.beta == Catch::Approx(m.intra.beta));
  CHECK(back.inter.alpha == Catch::Approx(m.inter.alpha));
  CHECK(back.inter.beta == Catch::Approx(m.inter.beta));
  CHECK(back.gamma == Catch::Approx(m.gamma));
  CHECK(back.machine == "test box");
  CHECK_THROWS_AS(cost_model::from_json("{}", "empty"), usage_error);
  CHECK_THROWS_AS(cost_model::from_json(R"({"format": "ringflow-cost-model", "intra_alpha_s": 1e-6,
      "intra_beta_s_per_byte": 1e-10, "inter_alpha_s": 1e-6, "inter_beta_s_per_byte": 1e-10,
      "gamma_s_per_byte": x})",
                                        "bad"),
                  usage_error);

  const std::string path = "ringflow_test_cost_model.json";
  save_cost_model(m, path);
  {
    scoped_env env("RINGFLOW_COST_MODEL", path.c_str());
    CHECK(cost_model_path() == path);
    CHECK(local_cost_model().intra.alpha == Catch::Approx(1.5e-6));
    // explain uses rank 0's model on every rank.
    require_none(run_collecting(3, [](communicator& c, failures& f) {
      const explanation e = explain(c, 4096);
      if (e.model_origin != "ringflow_test_cost_model.json") {
        f.push_back(fmt::format("rank {}: model from '{}'", c.rank(), e.model_origin));
      }
      if (e.shape.ranks != 3) f.push_back("wrong rank count in explain");
    }));
  }
  std::remove(path.c_str());
  {
    scoped_env env("RINGFLOW_COST_MODEL", "/nonexistent/ringflow/cost_model.json");
    CHECK(local_cost_model().origin == "built-in");
  }
}

TEST_CASE("emulated topology from RINGFLOW_NODE_SIZE", "[coll][topology]") {
  const topology t = topology::blocks(5, 2);
  CHECK(t.node_count() == 3);
  CHECK(t.max_node_size() == 2);
  CHECK(t.nodes[2] == std::vector<int>{4});
  CHECK(t.node_of == std::vector<int>{0, 0, 1, 1, 2});
  const topology h = topology::from_names({"a", "b", "a", "b"});
  CHECK(h.nodes[0] == std::vector<int>{0, 2});
  CHECK(h.describe() == "2 nodes x 2 ranks");
  scoped_env bad("RINGFLOW_NODE_SIZE", "two");
  CHECK_THROWS_AS(node_size_from_env(), usage_error);
}
