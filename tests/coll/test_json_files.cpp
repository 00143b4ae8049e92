// The library's JSON files written and read back with text that needs
// escaping (quotes, backslashes, control characters, invalid UTF-8), and
// refused when malformed or nested absurdly deep.
#include <string>

#include "ringflow/coll/cost_model.hpp"
#include "ringflow/coll/tuning.hpp"
#include "ringflow/core/error.hpp"
#include "support/catch.hpp"

using namespace ringflow;

namespace {
const std::string awkward = std::string("box \"7\" \\ tab\there\nnew line \x01\x1f end");

bool contains(const std::string& s, const std::string& part) {
  return s.find(part) != std::string::npos;
}

tuning_table small_table() {
  tuning_table t;
  t.ranks = 2;
  t.nodes = 1;
  t.ranks_per_node = 2;
  t.dtype = "f32 \"quoted\"";
  t.tuned_at = "at\n2026";
  tuning_row r;
  r.bytes = 4096;
  r.median = {{algo::ring, 4e-5}, {algo::tree, 2e-5}};
  r.best = algo::tree;
  t.rows.push_back(r);
  return t;
}
}  // namespace

TEST_CASE("a cost model whose machine name needs escaping round-trips", "[coll][json]") {
  cost_model m = builtin_cost_model();
  m.machine = awkward;
  const cost_model back = cost_model::from_json(m.to_json(), "mem");
  CHECK(back.machine == awkward);
  CHECK(back.intra.alpha == Catch::Approx(m.intra.alpha));
  // Invalid UTF-8 is replaced, never written raw (which no reader accepts).
  m.machine = "bad \xff\xfe byte";
  const cost_model replaced = cost_model::from_json(m.to_json(), "mem");
  CHECK(contains(replaced.machine, "bad "));
  CHECK(contains(replaced.machine, " byte"));
}

TEST_CASE("a tuning file whose strings need escaping round-trips", "[coll][json]") {
  tuning_file f;
  f.machine = awkward;
  f.put(small_table());
  const tuning_file back = tuning_file::from_json(f.to_json(), "mem");
  CHECK(back.machine == awkward);
  REQUIRE(back.tables.size() == 1);
  CHECK(back.tables[0].dtype == "f32 \"quoted\"");
  CHECK(back.tables[0].tuned_at == "at\n2026");
  CHECK(back.tables[0].rows[0].best == algo::tree);
}

TEST_CASE("malformed and deeply nested JSON is refused with where and why",
          "[coll][json][errors]") {
  auto refused = [](const std::string& text, const std::string& why) {
    try {
      (void)tuning_file::from_json(text, "/cache/t.json");
    } catch (const usage_error& e) {
      const std::string msg = e.what();
      INFO(msg);
      CHECK(contains(msg, "/cache/t.json"));
      CHECK(contains(msg, why));
      return;
    }
    FAIL("accepted: " << text.substr(0, 100));
  };
  refused(std::string(100000, '['), "nested more than");
  refused("{\"format\": \"ringflow-tuning\",\n \"version\": 1,\n \"machine\": \"x\" /* c */}",
          "line 3");
  refused("{\"format\": \"ringflow-tuning\"} trailing", "line 1");
  refused("{\"format\": \"ringflow-tuning\", \"version\": 1e999}", "number overflow");
  refused(
      "{\"format\": \"ringflow-tuning\", \"version\": 1, \"machine\": \"m\", \"tables\": "
      "[{\"ranks\": 2, \"nodes\": 1, \"ranks_per_node\": 2, \"sizes\": [{\"bytes\": 1, "
      "\"best\": 3, \"median_us\": {\"ring\": 1}}]}]}",
      "tables[0].sizes[0].best");
  try {
    (void)cost_model::from_json("{\"format\": \"ringflow-cost-model\", \"intra_alpha_s\": \"1\"}",
                                "c.json");
    FAIL("accepted a string for a number");
  } catch (const usage_error& e) {
    CHECK(contains(e.what(), "\"intra_alpha_s\" must be a number"));
    CHECK(contains(e.what(), "c.json"));
  }
}
