// Logging: level parsing and thresholds.
#include "ringflow/core/error.hpp"
#include "ringflow/core/log.hpp"
#include "support/catch.hpp"

using namespace ringflow;

TEST_CASE("log levels parse by name and number", "[core][log]") {
  CHECK(log::parse_level("debug") == log::level::debug);
  CHECK(log::parse_level("off") == log::level::off);
  CHECK(log::parse_level("3") == log::level::info);
  CHECK_THROWS_AS(log::parse_level("loud"), usage_error);
  try {
    log::parse_level("loud");
  } catch (const usage_error& e) {
    CHECK(std::string(e.what()).find("loud") != std::string::npos);
  }
}

TEST_CASE("set_level changes the threshold", "[core][log]") {
  const auto before = log::current_level();
  log::set_level(log::level::error);
  CHECK(log::current_level() == log::level::error);
  log::info("this line is below the threshold and not printed {}", 1);
  log::set_level(before);
}
