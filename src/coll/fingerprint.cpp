// Checked mode: an all-to-all of 32-byte fingerprints before a collective.
#include "ringflow/coll/fingerprint.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <vector>

#include "ringflow/core/error.hpp"

namespace ringflow {

namespace detail {
namespace {

std::string rank_list(const std::vector<int>& ranks) {
  if (ranks.size() == 1) return fmt::format("rank {}", ranks[0]);
  return fmt::format("ranks {}", fmt::join(ranks, ","));
}
}  // namespace

void verify_fingerprint(const communicator& comm, const fingerprint& mine) {
  const int p = comm.size();
  const int me = comm.rank();
  if (p == 1) return;
  transport& t = comm.raw();
  std::vector<fingerprint> all(static_cast<std::size_t>(p));
  all[static_cast<std::size_t>(me)] = mine;
  std::vector<request> reqs;
  reqs.reserve(2 * static_cast<std::size_t>(p));
  for (int q = 0; q < p; ++q) {
    if (q == me) continue;
    reqs.push_back(
        t.irecv(&all[static_cast<std::size_t>(q)], sizeof(fingerprint), q, fingerprint_tag));
  }
  for (int q = 0; q < p; ++q) {
    if (q == me) continue;
    reqs.push_back(t.isend(&mine, sizeof(fingerprint), q, fingerprint_tag));
  }
  wait_all(reqs);

  bool same = true;
  for (const auto& f : all) same = same && (f == all[0]);
  if (same) return;

  // Group ranks by what they called, in rank order, so every rank builds the
  // same message.
  std::vector<std::pair<fingerprint, std::vector<int>>> groups;
  for (int q = 0; q < p; ++q) {
    const auto& f = all[static_cast<std::size_t>(q)];
    auto it = std::find_if(groups.begin(), groups.end(), [&](auto& g) { return g.first == f; });
    if (it == groups.end()) {
      groups.push_back({f, {q}});
    } else {
      it->second.push_back(q);
    }
  }
  std::string msg = fmt::format("collective mismatch detected on rank {} (checked mode): ", me);
  for (std::size_t i = 0; i < groups.size(); ++i) {
    if (i) msg += "; ";
    msg += fmt::format("{} called {}", rank_list(groups[i].second), groups[i].first.describe());
  }
  msg +=
      ". Every rank must call the same collective with the same type, op, count and root, "
      "in the same order.";
  throw usage_error(msg);
}

}  // namespace detail
}  // namespace ringflow
