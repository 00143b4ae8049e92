// The one reader of ringflow's environment variables: every RINGFLOW_* value
// is parsed here, one way, and a malformed one is reported one way.
#pragma once

#include <cstdint>
#include <filesystem>
#include <initializer_list>
#include <optional>
#include <string>
#include <string_view>

namespace ringflow::env {

/// The rules every variable follows (README.md, "Environment variables",
/// lists them all):
/// - unset and set-but-empty are the same: the default;
/// - a switch is `1`, `on`, `true`, `yes` or `0`, `off`, `false`, `no`, in
///   any case; words (`full`, `avx2`, `off`...) are matched in any case too;
/// - numbers are whole text (no trailing characters) within a stated range;
/// - a malformed value either throws `usage_error` (`malformed::fail`) or
///   logs one warning and uses the default (`malformed::warn`); the text is
///   the same either way: `NAME='value' is <not valid | out of range>:
///   expected <what is accepted>`, plus `; using <default>` for a warning.
///
/// Nothing here caches: a caller that reads a value once per process keeps
/// it itself.
/// @code
/// using ringflow::env::malformed;
/// const bool on = ringflow::env::flag("RINGFLOW_FLIGHT", true, malformed::warn);
/// const auto n = ringflow::env::integer("RINGFLOW_FLIGHT_SIZE", 256, {1, 65536}, malformed::warn);
/// @endcode
enum class malformed {
  fail,  ///< throw usage_error
  warn,  ///< log::warn, then the default
};

/// What a switch accepts, for messages.
inline constexpr std::string_view switch_words = "1, on, true, yes or 0, off, false, no";

/// The variable's text; nullopt when it is unset or empty.
std::optional<std::string> text(const char* name);

/// Whether the variable is set to something non-empty.
bool is_set(const char* name);

// --- Parsers of one value (no environment involved; for tests and callers
// that combine them, such as RINGFLOW_CHECK's switch-or-word).

/// `true` for 1/on/true/yes, `false` for 0/off/false/no (any case), else nullopt.
std::optional<bool> parse_switch(std::string_view v) noexcept;

/// Case-insensitive (ASCII) equality.
bool iequals(std::string_view a, std::string_view b) noexcept;

/// A whole number, optionally signed; nullopt unless all of `v` is one that
/// fits in 64 bits.
std::optional<long long> parse_integer(std::string_view v) noexcept;

/// A finite real number (strtod syntax, no `inf`/`nan`); nullopt unless all
/// of `v` is one.
std::optional<double> parse_real(std::string_view v) noexcept;

/// A byte count: a whole number with an optional suffix K, M or G (any case,
/// optionally followed by `iB` or `B`: powers of 1024); nullopt unless all of
/// `v` is one that fits in 64 bits.
std::optional<std::uint64_t> parse_bytes(std::string_view v) noexcept;

/// The message for a malformed value: `NAME='value' is <problem>: expected
/// <accepted>`; with a non-empty `fallback`, `; using <fallback>` is added.
std::string malformed_text(std::string_view name, std::string_view value, std::string_view problem,
                           std::string_view accepted, std::string_view fallback = {});

/// Reports a malformed value: throws usage_error with malformed_text (fail),
/// or logs it as a warning (warn), in which case the caller uses `fallback`.
void report(malformed how, std::string_view name, std::string_view value, std::string_view problem,
            std::string_view accepted, std::string_view fallback);

// --- Readers of one variable.

/// A switch (see above); `fallback` when unset or, with malformed::warn, malformed.
bool flag(const char* name, bool fallback, malformed how);

/// Inclusive bounds of a whole number.
struct integer_range {
  long long lo;
  long long hi;
};

/// A whole number in `range`; `fallback` when unset or, with malformed::warn,
/// malformed or out of range.
long long integer(const char* name, long long fallback, integer_range range, malformed how);

/// Bounds of a real number; `lo_open` excludes `lo` itself ("above 0").
struct real_range {
  double lo;
  double hi;
  bool lo_open = false;
};

/// A finite real number in `range`; `fallback` as for integer.
double real(const char* name, double fallback, real_range range, malformed how);

/// A byte count (parse_bytes) in [lo, hi]. A malformed value: as for
/// integer. One out of range is clamped into it, with a warning (for either
/// `how`), since the nearest size is what the caller would choose anyway.
std::uint64_t bytes(const char* name, std::uint64_t fallback, std::uint64_t lo, std::uint64_t hi,
                    malformed how);

/// One of `words` (any case): its index; `fallback` (an index, or -1) when
/// unset or, with malformed::warn, not one of them.
int choice(const char* name, std::initializer_list<std::string_view> words, int fallback,
           malformed how);

/// ringflow's cache folder: `$XDG_CACHE_HOME/ringflow`, else
/// `$HOME/.cache/ringflow`, else `./.cache/ringflow` (tuning tables, the
/// cost model).
std::filesystem::path cache_dir();

}  // namespace ringflow::env
