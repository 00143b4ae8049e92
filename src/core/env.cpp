// The one reader of RINGFLOW_* environment variables (see core/env.hpp).
#include "ringflow/core/env.hpp"

#include <fmt/format.h>

#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstdlib>
#include <limits>

#include "ringflow/core/error.hpp"
#include "ringflow/core/log.hpp"

namespace ringflow::env {

namespace {

char lower(char c) noexcept { return c >= 'A' && c <= 'Z' ? static_cast<char>(c - 'A' + 'a') : c; }

// "a, b or c"
std::string list_words(std::initializer_list<std::string_view> words) {
  std::string out;
  std::size_t i = 0;
  for (std::string_view w : words) {
    if (i > 0) out += i + 1 == words.size() ? " or " : ", ";
    out += w;
    ++i;
  }
  return out;
}

std::string format_real(double v) { return fmt::format("{}", v); }

}  // namespace

std::optional<std::string> text(const char* name) {
  // The library's only getenv (but for cuda/, which reads the launcher's rank
  // and NCCL's own variables): everything else asks here.
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return std::nullopt;
  return std::string(v);
}

bool is_set(const char* name) { return text(name).has_value(); }

bool iequals(std::string_view a, std::string_view b) noexcept {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (lower(a[i]) != lower(b[i])) return false;
  }
  return true;
}

std::optional<bool> parse_switch(std::string_view v) noexcept {
  for (std::string_view w : {"1", "on", "true", "yes"}) {
    if (iequals(v, w)) return true;
  }
  for (std::string_view w : {"0", "off", "false", "no"}) {
    if (iequals(v, w)) return false;
  }
  return std::nullopt;
}

std::optional<long long> parse_integer(std::string_view v) noexcept {
  if (!v.empty() && v.front() == '+') v.remove_prefix(1);
  if (v.empty()) return std::nullopt;
  long long out = 0;
  const auto [p, ec] = std::from_chars(v.data(), v.data() + v.size(), out);
  if (ec != std::errc() || p != v.data() + v.size()) return std::nullopt;
  return out;
}

std::optional<double> parse_real(std::string_view v) noexcept {
  if (v.empty()) return std::nullopt;
  // strtod needs a terminated string; values are short.
  const std::string s(v);
  char* end = nullptr;
  errno = 0;
  const double x = std::strtod(s.c_str(), &end);
  if (end == s.c_str() || *end != '\0' || errno == ERANGE || !std::isfinite(x)) return std::nullopt;
  return x;
}

std::optional<std::uint64_t> parse_bytes(std::string_view v) noexcept {
  std::size_t digits = 0;
  while (digits < v.size() && v[digits] >= '0' && v[digits] <= '9') ++digits;
  if (digits == 0) return std::nullopt;
  std::uint64_t n = 0;
  const auto [p, ec] = std::from_chars(v.data(), v.data() + digits, n);
  if (ec != std::errc()) return std::nullopt;
  std::string_view suffix = v.substr(digits);
  int shift = 0;
  if (!suffix.empty()) {
    switch (lower(suffix.front())) {
      case 'k': shift = 10; break;
      case 'm': shift = 20; break;
      case 'g': shift = 30; break;
      default: return std::nullopt;
    }
    suffix.remove_prefix(1);
    if (!suffix.empty() && !iequals(suffix, "ib") && !iequals(suffix, "b")) return std::nullopt;
  }
  if (shift > 0 && n > (std::numeric_limits<std::uint64_t>::max() >> shift)) return std::nullopt;
  return n << shift;
}

std::string malformed_text(std::string_view name, std::string_view value, std::string_view problem,
                           std::string_view accepted, std::string_view fallback) {
  std::string out = fmt::format("{}='{}' is {}: expected {}", name, value, problem, accepted);
  if (!fallback.empty()) out += fmt::format("; using {}", fallback);
  return out;
}

void report(malformed how, std::string_view name, std::string_view value, std::string_view problem,
            std::string_view accepted, std::string_view fallback) {
  if (how == malformed::fail) throw usage_error(malformed_text(name, value, problem, accepted));
  log::warn("{}", malformed_text(name, value, problem, accepted, fallback));
}

bool flag(const char* name, bool fallback, malformed how) {
  const auto v = text(name);
  if (!v) return fallback;
  if (const auto b = parse_switch(*v)) return *b;
  report(how, name, *v, "not a switch", switch_words, fallback ? "on" : "off");
  return fallback;
}

long long integer(const char* name, long long fallback, integer_range range, malformed how) {
  const auto v = text(name);
  if (!v) return fallback;
  const std::string accepted = fmt::format("a whole number from {} to {}", range.lo, range.hi);
  const auto n = parse_integer(*v);
  if (!n) {
    report(how, name, *v, "not valid", accepted, fmt::format("{}", fallback));
    return fallback;
  }
  if (*n < range.lo || *n > range.hi) {
    report(how, name, *v, "out of range", accepted, fmt::format("{}", fallback));
    return fallback;
  }
  return *n;
}

double real(const char* name, double fallback, real_range range, malformed how) {
  const auto v = text(name);
  if (!v) return fallback;
  const std::string accepted =
      range.lo_open ? fmt::format("a number above {} and at most {}", range.lo, range.hi)
                    : fmt::format("a number from {} to {}", range.lo, range.hi);
  const auto x = parse_real(*v);
  if (!x) {
    report(how, name, *v, "not valid", accepted, format_real(fallback));
    return fallback;
  }
  const bool below = range.lo_open ? !(*x > range.lo) : !(*x >= range.lo);
  if (below || *x > range.hi) {
    report(how, name, *v, "out of range", accepted, format_real(fallback));
    return fallback;
  }
  return *x;
}

std::uint64_t bytes(const char* name, std::uint64_t fallback, std::uint64_t lo, std::uint64_t hi,
                    malformed how) {
  const auto v = text(name);
  if (!v) return fallback;
  const std::string accepted =
      fmt::format("a byte count from {} to {} (suffix K, M or G for KiB, MiB, GiB)", lo, hi);
  const auto n = parse_bytes(*v);
  if (!n) {
    report(how, name, *v, "not valid", accepted, fmt::format("{}", fallback));
    return fallback;
  }
  if (*n < lo || *n > hi) {
    const std::uint64_t clamped = *n < lo ? lo : hi;
    report(malformed::warn, name, *v, "out of range", accepted, fmt::format("{}", clamped));
    return clamped;
  }
  return *n;
}

int choice(const char* name, std::initializer_list<std::string_view> words, int fallback,
           malformed how) {
  const auto v = text(name);
  if (!v) return fallback;
  int i = 0;
  for (std::string_view w : words) {
    if (iequals(*v, w)) return i;
    ++i;
  }
  const std::string_view using_text =
      fallback >= 0 && static_cast<std::size_t>(fallback) < words.size()
          ? *(words.begin() + fallback)
          : std::string_view("the default");
  report(how, name, *v, "not valid", list_words(words), using_text);
  return fallback;
}

std::filesystem::path cache_dir() {
  if (const auto x = text("XDG_CACHE_HOME")) return std::filesystem::path(*x) / "ringflow";
  const auto home = text("HOME");
  return std::filesystem::path(home ? *home : std::string(".")) / ".cache" / "ringflow";
}

}  // namespace ringflow::env
