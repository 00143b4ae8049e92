// The command-line flag parser shared by ringflow-bench, the bench programs and the examples:
// checked numbers, one-line errors, exit status 2.
#pragma once

#include <fmt/format.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace ringflow::tool_flags {

/// A bad command line. The message is one line that names the flag and what
/// it accepts; the program prints it after its own name and exits with
/// status 2 (see report()).
class bad_flag : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// The exit status of a bad command line.
inline constexpr int bad_flag_status = 2;

/// Prints "<program>: <message>" and a pointer to --help on one line of
/// stderr; returns bad_flag_status for main to return.
inline int report(std::string_view program, const bad_flag& e) {
  std::fprintf(stderr, "%.*s: %s (see --help)\n", static_cast<int>(program.size()), program.data(),
               e.what());
  return bad_flag_status;
}

/// An integer in [lo, hi], the whole text (no sign games, no trailing garbage).
inline long long parse_int(std::string_view flag, std::string_view text, long long lo,
                           long long hi) {
  const std::string s(text);
  char* end = nullptr;
  errno = 0;
  const long long v = s.empty() ? 0 : std::strtoll(s.c_str(), &end, 10);
  const bool whole = !s.empty() && end == s.c_str() + s.size() &&
                     !std::isspace(static_cast<unsigned char>(s.front()));
  if (!whole || errno == ERANGE || v < lo || v > hi) {
    throw bad_flag(fmt::format("{} expects an integer in [{}, {}], got '{}'", flag, lo, hi, text));
  }
  return v;
}

/// A finite number in [lo, hi] (with `lo_open`: in (lo, hi]); decimal or
/// exponent notation (2.5e7), the whole text; inf and nan are refused.
inline double parse_number(std::string_view flag, std::string_view text, double lo, double hi,
                           bool lo_open = false) {
  const std::string s(text);
  char* end = nullptr;
  errno = 0;
  const double v = s.empty() ? 0 : std::strtod(s.c_str(), &end);
  const bool whole = !s.empty() && end == s.c_str() + s.size() &&
                     !std::isspace(static_cast<unsigned char>(s.front()));
  const bool in_range = std::isfinite(v) && (lo_open ? v > lo : v >= lo) && v <= hi;
  if (!whole || errno == ERANGE || !in_range) {
    throw bad_flag(fmt::format("{} expects a number in {}{}, {}], got '{}'", flag,
                               lo_open ? "(" : "[", lo, hi, text));
  }
  return v;
}

/// A whole count given as an integer or in exponent notation (25.6e6), in
/// [lo, hi]: for sizes people write as 1e9.
inline std::size_t parse_count(std::string_view flag, std::string_view text, std::size_t lo,
                               std::size_t hi) {
  double v = 0;
  try {
    v = parse_number(flag, text, static_cast<double>(lo), static_cast<double>(hi));
  } catch (const bad_flag&) {
    v = -1;
  }
  if (v < 0 || v != std::floor(v)) {
    throw bad_flag(
        fmt::format("{} expects a whole number in [{}, {}], got '{}'", flag, lo, hi, text));
  }
  return static_cast<std::size_t>(v);
}

/// "1K" -> 1024, "4M", "1G", "512", with an optional B or iB, any case, in
/// [lo, hi] bytes.
inline std::size_t parse_bytes(std::string_view flag, std::string_view text, std::size_t lo,
                               std::size_t hi) {
  const auto fail = [&] {
    return bad_flag(
        fmt::format("{} expects a byte count in [{}, {}] such as 1024, 64K, 4M or 1G, "
                    "got '{}'",
                    flag, lo, hi, text));
  };
  std::size_t digits = 0;
  while (digits < text.size() && std::isdigit(static_cast<unsigned char>(text[digits]))) ++digits;
  if (digits == 0 || digits > 19) throw fail();
  const unsigned long long v =
      std::strtoull(std::string(text.substr(0, digits)).c_str(), nullptr, 10);
  std::string suffix(text.substr(digits));
  std::transform(suffix.begin(), suffix.end(), suffix.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  unsigned long long scale = 1;
  if (!suffix.empty() && (suffix[0] == 'k' || suffix[0] == 'm' || suffix[0] == 'g')) {
    scale = suffix[0] == 'k' ? 1ull << 10 : suffix[0] == 'm' ? 1ull << 20 : 1ull << 30;
    suffix.erase(0, 1);
  }
  if (suffix == "b" || (scale > 1 && suffix == "ib")) suffix.clear();
  if (!suffix.empty() || v > std::numeric_limits<unsigned long long>::max() / scale) throw fail();
  const unsigned long long bytes = v * scale;
  if (bytes < lo || bytes > hi) throw fail();
  return static_cast<std::size_t>(bytes);
}

/// A comma-separated list of integers in [lo, hi], at most `max_items`.
inline std::vector<long long> parse_int_list(std::string_view flag, std::string_view text,
                                             long long lo, long long hi,
                                             std::size_t max_items = 1024) {
  std::vector<long long> out;
  for (std::size_t start = 0;;) {
    const std::size_t comma = text.find(',', start);
    if (out.size() == max_items) {
      throw bad_flag(fmt::format("{} takes at most {} comma-separated values", flag, max_items));
    }
    out.push_back(parse_int(
        flag, text.substr(start, comma == text.npos ? text.npos : comma - start), lo, hi));
    if (comma == text.npos) return out;
    start = comma + 1;
  }
}

/// Walks argv flag by flag: "--flag value" and "--flag=value" alike.
/// @code
///   tool_flags::reader args(argc, argv);
///   while (args.next()) {
///     if (args.is("--reps")) reps = static_cast<int>(args.integer(1, 1000));
///     else args.unknown();
///   }
/// @endcode
class reader {
 public:
  reader(int argc, char** argv) : argc_(argc), argv_(argv) {}

  /// Advances to the next flag; false when argv is used up.
  bool next() {
    if (++i_ >= argc_) return false;
    flag_ = argv_[i_];
    inline_ = false;
    value_.clear();
    if (flag_.rfind("--", 0) == 0) {
      if (const auto eq = flag_.find('='); eq != std::string::npos) {
        value_ = flag_.substr(eq + 1);
        flag_.resize(eq);
        inline_ = true;
      }
    }
    return true;
  }
  /// The current flag (without any =value).
  const std::string& flag() const { return flag_; }
  bool is(std::string_view name) const { return flag_ == name; }
  bool is(std::string_view a, std::string_view b) const { return flag_ == a || flag_ == b; }

  /// The flag's value: after '=' or the next argument.
  std::string value() {
    if (inline_) return value_;
    if (i_ + 1 >= argc_) throw bad_flag(fmt::format("{} needs a value", flag_));
    return argv_[++i_];
  }
  /// A non-empty value (paths, names).
  std::string text() {
    std::string v = value();
    if (v.empty()) throw bad_flag(fmt::format("{} needs a non-empty value", flag_));
    return v;
  }
  /// For switches: refuses "--flag=value".
  void no_value() const {
    if (inline_) throw bad_flag(fmt::format("{} takes no value", flag_));
  }
  long long integer(long long lo, long long hi) { return parse_int(flag_, value(), lo, hi); }
  double number(double lo, double hi, bool lo_open = false) {
    return parse_number(flag_, value(), lo, hi, lo_open);
  }
  std::size_t count(std::size_t lo, std::size_t hi) { return parse_count(flag_, value(), lo, hi); }
  std::size_t bytes(std::size_t lo, std::size_t hi) { return parse_bytes(flag_, value(), lo, hi); }
  std::vector<long long> integers(long long lo, long long hi, std::size_t max_items = 1024) {
    return parse_int_list(flag_, value(), lo, hi, max_items);
  }
  [[noreturn]] void unknown() const { throw bad_flag(fmt::format("unknown flag '{}'", flag_)); }

 private:
  int argc_;
  char** argv_;
  int i_ = 0;
  std::string flag_;
  std::string value_;
  bool inline_ = false;
};

}  // namespace ringflow::tool_flags
