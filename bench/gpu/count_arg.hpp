// The count arguments of the GPU benchmarks: "67108864", "64Mi", "64M",
// "16Ki", "16K" (K/M/G are binary). One parser for gpu-kernel-bench and
// gpu-staged-bench; each reports a bad value through its own usage().
#pragma once

#include <cstddef>
#include <cstdlib>
#include <optional>
#include <string>
#include <string_view>
#include <utility>

namespace ringflow::bench_gpu {

/// The positive count `s` names, or nullopt when it is not one.
inline std::optional<std::size_t> parse_count(std::string_view s) {
  std::size_t mult = 1;
  for (auto [suffix, m] : {std::pair<std::string_view, std::size_t>{"Ki", 1u << 10},
                           {"Mi", 1u << 20},
                           {"Gi", std::size_t{1} << 30},
                           {"K", 1u << 10},
                           {"M", 1u << 20},
                           {"G", std::size_t{1} << 30}}) {
    if (s.size() > suffix.size() && s.substr(s.size() - suffix.size()) == suffix) {
      s.remove_suffix(suffix.size());
      mult = m;
      break;
    }
  }
  const std::string digits(s);
  char* end = nullptr;
  const unsigned long long v = std::strtoull(digits.c_str(), &end, 10);
  if (digits.empty() || *end != '\0' || v == 0) return std::nullopt;
  return static_cast<std::size_t>(v) * mult;
}

}  // namespace ringflow::bench_gpu
