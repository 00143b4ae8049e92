// Tuning tables: the file round-trips, corrupt or foreign files are refused
// with a message naming them, automatic chooses from a matching table (with
// interpolation between tuned sizes) and falls back to the cost model
// otherwise; shm and oversubscription in the model.
#include <cmath>
#include <cstdio>
#include <fstream>
#include <string>

#include "ringflow/backends/local.hpp"
#include "ringflow/backends/shm.hpp"
#include "ringflow/coll/cost_model.hpp"
#include "ringflow/coll/explain.hpp"
#include "ringflow/coll/registry.hpp"
#include "ringflow/coll/tuning.hpp"
#include "support/catch.hpp"
#include "support/coll_checks.hpp"
#include "support/collect.hpp"

using namespace ringflow;
using ringflow::testing::failures;
using ringflow::testing::require_none;
using ringflow::testing::run_collecting;
using ringflow::testing::scoped_env;

namespace {

tuning_row row(std::size_t bytes, std::initializer_list<algo_prediction> medians_us) {
  tuning_row r;
  r.bytes = bytes;
  double best = -1;
  for (auto m : medians_us) {
    r.median.push_back({m.algorithm, m.seconds * 1e-6});
    if (best < 0 || m.seconds < best) best = m.seconds, r.best = m.algorithm;
  }
  return r;
}

// 3 ranks on one node: the tree wins small, halving-doubling in the middle,
// the ring large; shm is fastest at 64 KiB when it may run.
tuning_table table_for(int ranks) {
  tuning_table t;
  t.ranks = ranks;
  t.nodes = 1;
  t.ranks_per_node = ranks;
  t.cores_per_node = 2;
  t.reps = 9;
  t.tuned_at = "2026-11-26T07:00:00Z";
  t.rows.push_back(row(4096, {{algo::ring, 40}, {algo::halving_doubling, 30}, {algo::tree, 20}}));
  t.rows.push_back(row(
      65536, {{algo::ring, 100}, {algo::halving_doubling, 60}, {algo::tree, 90}, {algo::shm, 50}}));
  t.rows.push_back(
      row(1 << 20, {{algo::ring, 500}, {algo::halving_doubling, 700}, {algo::tree, 900}}));
  return t;
}

std::string write_file(const std::string& path, const std::string& text) {
  std::ofstream(path) << text;
  return path;
}

bool contains(const std::string& s, const std::string& part) {
  return s.find(part) != std::string::npos;
}

}  // namespace

TEST_CASE("tuning files round-trip", "[coll][tuning]") {
  tuning_file f;
  f.machine = "box \"7\"";
  f.put(table_for(4));
  f.put(table_for(2));
  REQUIRE(f.tables.size() == 2);
  CHECK(f.tables[0].ranks == 2);  // kept sorted
  const tuning_file back = tuning_file::from_json(f.to_json(), "mem");
  CHECK(back.machine == f.machine);
  CHECK(back.origin == "mem");
  REQUIRE(back.tables.size() == 2);
  const tuning_table& t = back.tables[1];
  CHECK(t.ranks == 4);
  CHECK(t.nodes == 1);
  CHECK(t.ranks_per_node == 4);
  CHECK(t.cores_per_node == 2);
  CHECK(t.reps == 9);
  CHECK(t.tuned_at == "2026-11-26T07:00:00Z");
  REQUIRE(t.rows.size() == 3);
  CHECK(t.rows[1].bytes == 65536);
  CHECK(t.rows[1].best == algo::shm);
  REQUIRE(t.rows[1].median.size() == 4);
  CHECK(t.rows[1].median[2].algorithm == algo::tree);
  CHECK(t.rows[1].median[2].seconds == Catch::Approx(90e-6));
  // put() replaces the table of the same shape.
  tuning_file g = back;
  tuning_table newer = table_for(4);
  newer.rows.pop_back();
  g.put(newer);
  REQUIRE(g.tables.size() == 2);
  CHECK(g.tables[1].rows.size() == 2);
  CHECK(g.find(cluster_shape{4, 1, 4}) == &g.tables[1]);
  CHECK(g.find(cluster_shape{3, 1, 3}) == nullptr);
  CHECK(g.find(cluster_shape{4, 2, 2}) == nullptr);  // same ranks, other layout

  const std::string path = "ringflow_test_tuning_roundtrip.json";
  save_tuning_file(back, path);
  const auto read = read_tuning_file(path);
  REQUIRE(read.has_value());
  CHECK(read->origin == path);
  CHECK(read->tables.size() == 2);
  std::remove(path.c_str());
  CHECK_FALSE(read_tuning_file(path).has_value());  // no file: no table, no error
  CHECK_FALSE(read_tuning_file("").has_value());
}

TEST_CASE("tuning sessions of the same sizes average, others replace", "[coll][tuning]") {
  const tuning_table first = table_for(4);
  tuning_table second = table_for(4);
  // The second session finds the ring twice as fast at 1 MiB and the tree
  // four times slower at 4 KiB.
  second.rows[2].median[0].seconds = 250e-6;
  second.rows[0].median[2].seconds = 80e-6;
  second.tuned_at = "later";
  const tuning_table m = merge_sessions(first, second);
  CHECK(m.sessions == 2);
  CHECK(m.tuned_at == "later");
  CHECK(m.rows[2].median[0].seconds == Catch::Approx(std::sqrt(500e-6 * 250e-6)));
  CHECK(m.rows[0].median[2].seconds == Catch::Approx(40e-6));  // sqrt(20 * 80)
  CHECK(m.rows[0].best == algo::halving_doubling);             // 30 < 40
  // A third session counts the first two twice.
  const tuning_table m3 = merge_sessions(m, first);
  CHECK(m3.sessions == 3);
  CHECK(m3.rows[0].median[2].seconds == Catch::Approx(std::cbrt(40e-6 * 40e-6 * 20e-6)));
  CHECK(tuning_file::from_json(
            [&] {
              tuning_file f;
              f.machine = "box";
              f.put(m3);
              return f.to_json();
            }(),
            "mem")
            .tables[0]
            .sessions == 3);
  // Other sizes or another shape: the fresh table as it is.
  tuning_table other_sizes = table_for(4);
  other_sizes.rows.pop_back();
  CHECK(merge_sessions(first, other_sizes).sessions == 1);
  CHECK(merge_sessions(first, other_sizes).rows.size() == 2);
  CHECK(merge_sessions(table_for(2), first).sessions == 1);
}

TEST_CASE("corrupt tuning files are refused with a message naming the file",
          "[coll][tuning][errors]") {
  tuning_file f;
  f.machine = "box";
  f.put(table_for(2));
  const std::string good = f.to_json();
  auto refused = [](const std::string& text, const std::string& why) {
    try {
      (void)tuning_file::from_json(text, "/cache/tuning-box.json");
    } catch (const usage_error& e) {
      const std::string msg = e.what();
      INFO(msg);
      CHECK(contains(msg, "/cache/tuning-box.json"));
      CHECK(contains(msg, why));
      CHECK(contains(msg, "--tune"));  // says what to do
      return;
    }
    FAIL("accepted: " << text.substr(0, 200));
  };
  refused("", "unexpected end of input");
  refused(good.substr(0, good.size() / 2), "line");
  refused("{\"format\": \"ringflow-cost-model\", \"version\": 1}", "not a ringflow tuning table");
  auto with = [&](const std::string& from, const std::string& to) {
    std::string s = good;
    const auto at = s.find(from);
    REQUIRE(at != std::string::npos);
    s.replace(at, from.size(), to);
    return s;
  };
  refused(with("\"version\": 1", "\"version\": 2"), "version 2 is not supported");
  refused(with("\"machine\": \"box\",", ""), "\"machine\" is missing");
  refused(with("\"bytes\": 65536", "\"bytes\": 1024"), "sizes must ascend");
  refused(with("\"tree\": 90.000", "\"butterfly\": 90.000"), "unknown algorithm 'butterfly'");
  refused(with("\"tree\": 90.000", "\"native\": 90.000"), "'native' cannot be a tuned choice");
  refused(with("\"tree\": 90.000", "\"tree\": -90"), "must be a positive number");
  refused(with("\"best\": \"shm\"", "\"best\": \"ring\""), "is not the lowest median");
  refused(with("\"ranks_per_node\": 2", "\"ranks_per_node\": 1"), "is not a layout");
  refused(with("\"ranks\": 2", "\"ranks\": 2.5"), "whole number");
  {
    tuning_file twice = f;
    twice.tables.push_back(twice.tables.front());
    refused(twice.to_json(), "two tables for 2 ranks");
  }

  // On disk, through explain: a corrupt file is reported (logged) and the
  // model decides; the explanation says why no table was used.
  const std::string path = write_file("ringflow_test_tuning_corrupt.json", "{\"format\": ");
  try {
    (void)read_tuning_file(path);
    FAIL("read a corrupt file");
  } catch (const usage_error& e) {
    CHECK(contains(e.what(), path));
  }
  {
    scoped_env env("RINGFLOW_TUNING", path.c_str());
    require_none(run_collecting(2, [&](communicator& c, failures& fl) {
      const explanation e = explain(c, 4096);
      if (e.from_table) fl.push_back("a corrupt table was used");
      if (!contains(e.table_note, path) || !contains(e.table_note, "unusable")) {
        fl.push_back("note: " + e.table_note);
      }
      if (!contains(e.to_string(), "no tuning table used")) fl.push_back(e.to_string());
      testing::check_allreduce<float>(c, 1000, sum, false, coll_options{}, fl);
    }));
  }
  std::remove(path.c_str());
}

TEST_CASE("automatic chooses from a matching tuning table", "[coll][tuning]") {
  const tuning_table t = table_for(3);
  const cost_model m = builtin_cost_model();
  const cluster_shape three{3, 1, 3, 2, false};
  // At a tuned size: the measured fastest (shm is not allowed here).
  explanation e = choose_algorithm(&t, "syn.json", m, three, 4096);
  CHECK(e.from_table);
  CHECK(e.choice == algo::tree);
  CHECK(e.predicted_s == Catch::Approx(20e-6));
  CHECK(e.runner_up == algo::halving_doubling);
  CHECK(e.table_rows == "4096");
  CHECK(contains(e.to_string(), "tuning table syn.json"));
  CHECK(contains(e.to_string(), "measured"));
  CHECK(choose_algorithm(&t, "syn.json", m, three, 65536).choice == algo::halving_doubling);
  // shm when it may run (and is registered: the MPI backend does that).
  REQUIRE(detail::shm_register());
  cluster_shape with_shm = three;
  with_shm.shm = true;
  CHECK(choose_algorithm(&t, "syn.json", m, with_shm, 65536).choice == algo::shm);
  // Between tuned sizes: log-log interpolation of each algorithm's medians.
  // At 16 KiB (halfway in log between 4 KiB and 64 KiB): tree sqrt(20*90)
  // = 42.4 us, halving-doubling sqrt(30*60) = 42.4 us, ring sqrt(40*100).
  e = choose_algorithm(&t, "syn.json", m, three, 16384);
  CHECK(e.table_rows == "4096..65536");
  REQUIRE(e.candidates.size() == 3);
  CHECK(e.candidates[0].seconds == Catch::Approx(std::sqrt(20.0 * 90.0) * 1e-6));
  CHECK(choose_algorithm(&t, "syn.json", m, three, 8192).choice == algo::tree);
  CHECK(choose_algorithm(&t, "syn.json", m, three, 32768).choice == algo::halving_doubling);
  // Interpolated between 64 KiB and 1 MiB (shm only measured at 64 KiB:
  // it has no interpolation, so it is not a candidate there).
  CHECK(choose_algorithm(&t, "syn.json", m, with_shm, 512 * 1024).choice == algo::ring);
  // Up to a factor 4 outside the tuned range: the nearest size.
  CHECK(choose_algorithm(&t, "syn.json", m, three, 1024).from_table);
  CHECK(choose_algorithm(&t, "syn.json", m, three, 1024).choice == algo::tree);
  CHECK(choose_algorithm(&t, "syn.json", m, three, 4 << 20).choice == algo::ring);
  // Beyond: the cost model, saying why.
  e = choose_algorithm(&t, "syn.json", m, three, 256);
  CHECK_FALSE(e.from_table);
  CHECK(e.choice == choose_algorithm(m, three, 256).choice);
  CHECK(contains(e.table_note, "outside the sizes tuned"));
  CHECK_FALSE(choose_algorithm(&t, "syn.json", m, three, 64 << 20).from_table);
  // fastest_algorithm agrees with choose_algorithm everywhere.
  for (std::size_t b = 64; b <= (std::size_t{64} << 20); b *= 2) {
    for (const cluster_shape& s : {three, with_shm}) {
      CHECK(fastest_algorithm(&t, m, s, b) == choose_algorithm(&t, "x", m, s, b).choice);
    }
  }
}

TEST_CASE("automatic falls back to the model when no table matches the ranks or layout",
          "[coll][tuning]") {
  const tuning_table t = table_for(4);
  const cost_model m = builtin_cost_model();
  for (const cluster_shape& s : {cluster_shape{3, 1, 3}, cluster_shape{4, 2, 2}}) {
    const explanation e = choose_algorithm(&t, "syn.json", m, s, 4096, "no table for this shape");
    CHECK_FALSE(e.from_table);
    CHECK(e.choice == choose_algorithm(m, s, 4096).choice);
    CHECK(e.table_note == "no table for this shape");
    CHECK(contains(e.to_string(), "no tuning table used: no table for this shape"));
    CHECK(fastest_algorithm(&t, m, s, 4096) == e.choice);
  }

  // Through the communicator: rank 0's file with tables for 3 ranks; 3
  // thread ranks use it (every rank the same), 2 ranks fall back.
  tuning_file f;
  f.machine = tuning_host();
  f.put(table_for(3));
  const std::string path = "ringflow_test_tuning_threads.json";
  save_tuning_file(f, path);
  {
    scoped_env env("RINGFLOW_TUNING", path.c_str());
    require_none(run_collecting(3, [&](communicator& c, failures& fl) {
      const explanation e = explain(c, 4096);
      if (!e.from_table || e.choice != algo::tree || e.table_origin != path) {
        fl.push_back(fmt::format("rank {}: {}", c.rank(), e.to_string()));
      }
      // And the automatic allreduce runs what the table says, correctly.
      testing::check_allreduce<float>(c, 1024, sum, false, coll_options{}, fl);
      testing::check_allreduce<std::int32_t>(c, 16384, max, true, coll_options{}, fl);
    }));
    require_none(run_collecting(2, [&](communicator& c, failures& fl) {
      const explanation e = explain(c, 4096);
      if (e.from_table || !contains(e.table_note, "no table for 2 ranks")) {
        fl.push_back(fmt::format("rank {}: {}", c.rank(), e.to_string()));
      }
    }));
  }
  {
    // A file from another machine is not used.
    tuning_file other = f;
    other.machine = "some-other-host";
    save_tuning_file(other, path);
    scoped_env env("RINGFLOW_TUNING", path.c_str());
    require_none(run_collecting(3, [&](communicator& c, failures& fl) {
      const explanation e = explain(c, 4096);
      if (e.from_table || !contains(e.table_note, "unusable")) fl.push_back(e.to_string());
    }));
  }
  {
    scoped_env env("RINGFLOW_TUNING", "off");
    CHECK(tuning_path().empty());
    require_none(run_collecting(3, [&](communicator& c, failures& fl) {
      const explanation e = explain(c, 4096);
      if (e.from_table || e.table_note != "RINGFLOW_TUNING=off") fl.push_back(e.to_string());
    }));
  }
  std::remove(path.c_str());
  {
    scoped_env env("RINGFLOW_TUNING", nullptr);
    scoped_env xdg("XDG_CACHE_HOME", "/xdg");
    CHECK(tuning_path() == "/xdg/ringflow/tuning-" + tuning_host() + ".json");
  }
}

TEST_CASE("the model covers shm and oversubscribed nodes", "[coll][cost_model][tuning]") {
  // The MPI backend registers shm (and its cost) with its first
  // communicator; this test makes none, so it registers it itself.
  REQUIRE(detail::shm_register());
  REQUIRE(ext::registered_cost(algo::shm) != nullptr);
  const cost_model m = builtin_cost_model();
  cluster_shape one{4, 1, 4};
  CHECK(predict_seconds(algo::shm, m, one, 4096) < 0);  // not available
  one.shm = true;
  CHECK(predict_seconds(algo::shm, m, one, 4096) > 0);
  CHECK(predict_seconds(algo::shm, m, cluster_shape{8, 2, 4, 0, true}, 4096) < 0);  // two nodes
  CHECK(choose_algorithm(m, one, 4096).candidates.size() == 5);  // shm among them
  // Oversubscription: 4 ranks on 2 cores pay for every step that needs all
  // of them; the ring (6 such steps) most, a one-segment tree (only a parent
  // and its children at a time) least.
  const cluster_shape idle{4, 1, 4, 4}, crowded{4, 1, 4, 2};
  CHECK(oversubscription(idle) == 0);
  CHECK(oversubscription(crowded) == Catch::Approx(1.0));
  CHECK(oversubscription(cluster_shape{4, 1, 4, 0}) == 0);  // cores unknown
  auto extra = [&](algo a, std::size_t b) {
    return predict_seconds(a, m, crowded, b) - predict_seconds(a, m, idle, b);
  };
  for (algo a : {algo::ring, algo::recursive_doubling, algo::halving_doubling, algo::tree,
                 algo::double_tree}) {
    CHECK(extra(a, 1024) > 0);
  }
  CHECK(extra(algo::ring, 1024) > extra(algo::halving_doubling, 1024));
  CHECK(extra(algo::halving_doubling, 1024) > extra(algo::tree, 1024));
  CHECK(choose_algorithm(m, crowded, 1024).choice != algo::ring);
  // The parameter round-trips through the model file.
  cost_model c = m;
  c.oversubscribed_step = 3e-6;
  CHECK(cost_model::from_json(c.to_json(), "t").oversubscribed_step == Catch::Approx(3e-6));
}
