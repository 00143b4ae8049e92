// Algorithm names: parse_algo (the names algo_name prints, plus short aliases).
#include "ringflow/coll/options.hpp"

#include <fmt/format.h>

#include <string>

#include "ringflow/core/error.hpp"

namespace ringflow {

algo parse_algo(std::string_view text) {
  for (algo a : all_algos) {
    if (text == algo_name(a)) return a;
  }
  if (text == "automatic") return algo::automatic;
  if (text == "rd") return algo::recursive_doubling;
  if (text == "hd" || text == "rabenseifner") return algo::halving_doubling;
  if (text == "dtree") return algo::double_tree;
  std::string names;
  for (algo a : all_algos) names += fmt::format("{}{}", names.empty() ? "" : ", ", algo_name(a));
  throw usage_error(fmt::format("unknown algorithm '{}': use one of {}", text, names));
}

}  // namespace ringflow
