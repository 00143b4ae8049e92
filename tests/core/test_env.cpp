// The environment reader: switches, numbers, byte counts and words parsed
// one way, and malformed values reported one way (naming variable, value and
// what is accepted).
#include <string>

#include "ringflow/core/env.hpp"
#include "ringflow/core/error.hpp"
#include "ringflow/core/log.hpp"
#include "support/catch.hpp"
#include "support/collect.hpp"

using namespace ringflow;
using env::malformed;
using ringflow::testing::scoped_env;

namespace {

bool contains(const std::string& s, const std::string& part) {
  return s.find(part) != std::string::npos;
}

// The usage_error text of `fn`, or "(no error)".
template <class Fn>
std::string refusal(Fn&& fn) {
  try {
    fn();
  } catch (const usage_error& e) {
    return e.what();
  }
  return "(no error)";
}

// Warnings are expected below; keep them off the test's output.
struct quiet_log {
  log::level before = log::current_level();
  quiet_log() { log::set_level(log::level::error); }
  ~quiet_log() { log::set_level(before); }
};

constexpr const char* var = "RINGFLOW_TEST_ENV_READER";

}  // namespace

TEST_CASE("switches accept 1/on/true/yes and 0/off/false/no in any case", "[core][env]") {
  for (const char* on : {"1", "on", "true", "yes", "ON", "True", "YES"}) {
    INFO(on);
    CHECK(env::parse_switch(on) == std::optional<bool>(true));
  }
  for (const char* off : {"0", "off", "false", "no", "OFF", "False", "No"}) {
    INFO(off);
    CHECK(env::parse_switch(off) == std::optional<bool>(false));
  }
  for (const char* bad : {"", "2", "onn", "y", "enable", " 1", "1 "}) {
    INFO(bad);
    CHECK_FALSE(env::parse_switch(bad).has_value());
  }
  CHECK(env::iequals("Stamp", "stamp"));
  CHECK_FALSE(env::iequals("stamp", "stam"));
}

TEST_CASE("numbers are whole text within 64 bits", "[core][env]") {
  CHECK(env::parse_integer("42") == std::optional<long long>(42));
  CHECK(env::parse_integer("+7") == std::optional<long long>(7));
  CHECK(env::parse_integer("-3") == std::optional<long long>(-3));
  CHECK(env::parse_integer("9223372036854775807") ==
        std::optional<long long>(9223372036854775807LL));
  for (const char* bad : {"", "+", "4x", "x4", "1.5", "9223372036854775808", " 4"}) {
    INFO(bad);
    CHECK_FALSE(env::parse_integer(bad).has_value());
  }
  CHECK(env::parse_real("2.5") == std::optional<double>(2.5));
  CHECK(env::parse_real("1e3") == std::optional<double>(1000.0));
  CHECK(env::parse_real("0") == std::optional<double>(0.0));
  for (const char* bad : {"", "fast", "1.5s", "inf", "nan", "1e999"}) {
    INFO(bad);
    CHECK_FALSE(env::parse_real(bad).has_value());
  }
}

TEST_CASE("byte counts take K, M, G suffixes (powers of 1024)", "[core][env]") {
  CHECK(env::parse_bytes("4096") == std::optional<std::uint64_t>(4096));
  CHECK(env::parse_bytes("64K") == std::optional<std::uint64_t>(64 * 1024));
  CHECK(env::parse_bytes("64k") == std::optional<std::uint64_t>(64 * 1024));
  CHECK(env::parse_bytes("4M") == std::optional<std::uint64_t>(4u << 20));
  CHECK(env::parse_bytes("4MiB") == std::optional<std::uint64_t>(4u << 20));
  CHECK(env::parse_bytes("1G") == std::optional<std::uint64_t>(1u << 30));
  CHECK(env::parse_bytes("2kb") == std::optional<std::uint64_t>(2048));
  for (const char* bad :
       {"", "K", "-4K", "4T", "4Kx", "4 K", "99999999999999999999", "17179869184G"}) {
    INFO(bad);
    CHECK_FALSE(env::parse_bytes(bad).has_value());
  }
}

TEST_CASE("unset and empty are the default", "[core][env]") {
  scoped_env unset(var, nullptr);
  CHECK_FALSE(env::text(var).has_value());
  CHECK_FALSE(env::is_set(var));
  CHECK(env::flag(var, true, malformed::fail));
  CHECK(env::integer(var, 7, {1, 10}, malformed::fail) == 7);
  CHECK(env::real(var, 2.5, {0, 10}, malformed::fail) == 2.5);
  CHECK(env::bytes(var, 4096, 1, 1 << 20, malformed::fail) == 4096);
  CHECK(env::choice(var, {"a", "b"}, 1, malformed::fail) == 1);
  scoped_env empty(var, "");
  CHECK_FALSE(env::text(var).has_value());
  CHECK_FALSE(env::flag(var, false, malformed::fail));
  CHECK(env::integer(var, 7, {1, 10}, malformed::fail) == 7);
  scoped_env set(var, "x");
  CHECK(env::text(var) == std::optional<std::string>("x"));
  CHECK(env::is_set(var));
}

TEST_CASE("a malformed value fails naming the variable, the value and what is accepted",
          "[core][env]") {
  {
    scoped_env v(var, "sometimes");
    const std::string e = refusal([] { (void)env::flag(var, true, malformed::fail); });
    INFO(e);
    CHECK(e ==
          "RINGFLOW_TEST_ENV_READER='sometimes' is not a switch: expected 1, on, true, yes "
          "or 0, off, false, no");
  }
  {
    scoped_env v(var, "four");
    const std::string e = refusal([] { (void)env::integer(var, 1, {1, 16}, malformed::fail); });
    INFO(e);
    CHECK(e ==
          "RINGFLOW_TEST_ENV_READER='four' is not valid: expected a whole number from 1 to 16");
  }
  {
    scoped_env v(var, "17");
    const std::string e = refusal([] { (void)env::integer(var, 1, {1, 16}, malformed::fail); });
    INFO(e);
    CHECK(e ==
          "RINGFLOW_TEST_ENV_READER='17' is out of range: expected a whole number from 1 to 16");
  }
  {
    scoped_env v(var, "0");
    const std::string e = refusal(
        [] { (void)env::real(var, 1, {.lo = 0, .hi = 100, .lo_open = true}, malformed::fail); });
    INFO(e);
    CHECK(e ==
          "RINGFLOW_TEST_ENV_READER='0' is out of range: expected a number above 0 and at "
          "most 100");
  }
  {
    scoped_env v(var, "-1");
    const std::string e = refusal([] { (void)env::real(var, 1, {0, 100}, malformed::fail); });
    CHECK(contains(e, "'-1' is out of range: expected a number from 0 to 100"));
  }
  {
    scoped_env v(var, "avx3");
    const std::string e = refusal([] {
      (void)env::choice(var, {"baseline", "avx2", "avx512"}, 0, malformed::fail);
    });
    INFO(e);
    CHECK(e == "RINGFLOW_TEST_ENV_READER='avx3' is not valid: expected baseline, avx2 or avx512");
  }
  {
    scoped_env v(var, "lots");
    const std::string e = refusal([] { (void)env::bytes(var, 1, 4096, 8192, malformed::fail); });
    CHECK(contains(e, "RINGFLOW_TEST_ENV_READER='lots' is not valid: expected a byte count"));
  }
}

TEST_CASE("a malformed value can instead warn and use the default", "[core][env]") {
  quiet_log quiet;
  {
    scoped_env v(var, "maybe");
    CHECK(env::flag(var, true, malformed::warn));
    CHECK_FALSE(env::flag(var, false, malformed::warn));
  }
  {
    scoped_env v(var, "0");
    CHECK(env::integer(var, 256, {1, 65536}, malformed::warn) == 256);
  }
  {
    scoped_env v(var, "12abc");
    CHECK(env::integer(var, 256, {1, 65536}, malformed::warn) == 256);
    CHECK(env::real(var, 600, {0, 1e9}, malformed::warn) == 600);
  }
  {
    scoped_env v(var, "AVX2");
    CHECK(env::choice(var, {"baseline", "avx2", "avx512"}, 2, malformed::warn) == 1);
  }
  {
    scoped_env v(var, "sse");
    CHECK(env::choice(var, {"baseline", "avx2", "avx512"}, 2, malformed::warn) == 2);
  }
  CHECK(env::malformed_text("RINGFLOW_X", "y", "not valid", "a or b", "a") ==
        "RINGFLOW_X='y' is not valid: expected a or b; using a");
}

TEST_CASE("accepted values pass through, byte counts out of range are clamped", "[core][env]") {
  quiet_log quiet;
  {
    scoped_env v(var, "Off");
    CHECK_FALSE(env::flag(var, true, malformed::fail));
  }
  {
    scoped_env v(var, "16");
    CHECK(env::integer(var, 1, {1, 16}, malformed::fail) == 16);
  }
  {
    scoped_env v(var, "0.25");
    CHECK(env::real(var, 1, {0, 100}, malformed::fail) == 0.25);
  }
  {
    scoped_env v(var, "64K");
    CHECK(env::bytes(var, 1, 4096, 1 << 20, malformed::fail) == 64 * 1024);
  }
  {
    scoped_env v(var, "1K");  // below: the smallest
    CHECK(env::bytes(var, 8192, 4096, 1 << 20, malformed::fail) == 4096);
  }
  {
    scoped_env v(var, "1G");  // above: the largest
    CHECK(env::bytes(var, 8192, 4096, 1 << 20, malformed::fail) == 1 << 20);
  }
}

TEST_CASE("the cache folder follows XDG_CACHE_HOME, then HOME", "[core][env]") {
  {
    scoped_env xdg("XDG_CACHE_HOME", "/xdg");
    CHECK(env::cache_dir() == std::filesystem::path("/xdg/ringflow"));
  }
  {
    scoped_env xdg("XDG_CACHE_HOME", nullptr);
    scoped_env home("HOME", "/home/someone");
    CHECK(env::cache_dir() == std::filesystem::path("/home/someone/.cache/ringflow"));
  }
  {
    scoped_env xdg("XDG_CACHE_HOME", "");
    scoped_env home("HOME", nullptr);
    CHECK(env::cache_dir() == std::filesystem::path("./.cache/ringflow"));
  }
}
