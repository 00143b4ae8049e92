// Traces (the trainer's timeline and the pipeline executor's) are valid JSON
// whatever the event names hold, and read back exactly.
#include <filesystem>
#include <fstream>
#include <string>

#include "ringflow/core/error.hpp"
#include "ringflow/pipeline/executor.hpp"
#include "ringflow/train/timeline.hpp"
#include "support/catch.hpp"

using namespace ringflow;
namespace fs = std::filesystem;

TEST_CASE("timeline event names with control characters survive write and read", "[train][json]") {
  const fs::path dir = fs::temp_directory_path() / "ringflow_trace_json";
  fs::create_directories(dir);
  const std::string name = std::string("bucket \"3\"\t\\\x02 done\n");
  train::timeline tl(0, dir / "t.json");
  tl.record(name, train::lane::comm, 10, 25, 4);
  tl.write();
  const auto back = train::read_trace(tl.file());
  REQUIRE(back.size() == 1);
  CHECK(back[0].name == name);
  CHECK(back[0].lane == train::lane::comm);
  CHECK(back[0].step == 4);
  CHECK(back[0].duration_us == Catch::Approx(15));
}

TEST_CASE("pipeline traces escape event names and read back as traces", "[pipeline][json]") {
  const fs::path dir = fs::temp_directory_path() / "ringflow_trace_json";
  fs::create_directories(dir);
  pipeline::trace_event e;
  e.name = std::string("F1.\x01\"3\"");
  e.category = "forward";
  e.start_us = 5;
  e.duration_us = 7;
  const std::string text = pipeline::chrome_trace_json({{e}, {}});
  const fs::path p = dir / "pipe.json";
  {
    std::ofstream f(p, std::ios::binary);
    f << text;
  }
  const auto back = train::read_trace(p);
  REQUIRE(back.size() == 1);
  CHECK(back[0].name == e.name);
  CHECK(back[0].duration_us == Catch::Approx(7));

  std::ofstream(dir / "bad.json", std::ios::binary) << "{\"traceEvents\": [";
  try {
    (void)train::read_trace(dir / "bad.json");
    FAIL("read a truncated trace");
  } catch (const error& err) {
    CHECK(std::string(err.what()).find("line 1") != std::string::npos);
  }
}
