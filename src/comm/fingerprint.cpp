// Fingerprints of collectives: names, descriptions, the check mode from the
// environment, and the text of a stamp mismatch.
#include "ringflow/comm/fingerprint.hpp"

#include <fmt/format.h>

#include <cstdlib>
#include <initializer_list>

#include "ringflow/comm/transport.hpp"
#include "ringflow/core/env.hpp"
#include "ringflow/core/log.hpp"

namespace ringflow {

std::string_view coll_name(coll_kind k) {
  switch (k) {
    case coll_kind::allreduce: return "allreduce";
    case coll_kind::reduce_scatter: return "reduce_scatter";
    case coll_kind::allgather: return "allgather";
    case coll_kind::broadcast: return "broadcast";
    case coll_kind::barrier: return "barrier";
    case coll_kind::alltoall: return "alltoall";
    case coll_kind::alltoallv: return "alltoallv";
    case coll_kind::gather: return "gather";
    case coll_kind::gatherv: return "gatherv";
    case coll_kind::scatter: return "scatter";
    case coll_kind::scatterv: return "scatterv";
    case coll_kind::reduce: return "reduce";
    case coll_kind::allgatherv: return "allgatherv";
    case coll_kind::reduce_scatter_v: return "reduce_scatter_v";
  }
  return "unknown";
}

std::string fingerprint::describe() const {
  std::string s = fmt::format("{}(type={}, ", coll_name(kind), dtype_name(type));
  const auto is = [&](std::initializer_list<coll_kind> ks) {
    for (coll_kind k : ks) {
      if (kind == k) return true;
    }
    return false;
  };
  if (is({coll_kind::allreduce, coll_kind::reduce_scatter, coll_kind::reduce,
          coll_kind::reduce_scatter_v})) {
    s += fmt::format("op={}, ", op_name(op));
  }
  if (is({coll_kind::broadcast, coll_kind::gather, coll_kind::gatherv, coll_kind::scatter,
          coll_kind::scatterv, coll_kind::reduce})) {
    s += fmt::format("root={}, ", root);
  }
  if (is({coll_kind::alltoallv, coll_kind::gatherv, coll_kind::scatterv})) {
    s += fmt::format("counts per peer) as collective #{}", sequence);
    return s;
  }
  if (is({coll_kind::allgatherv, coll_kind::reduce_scatter_v})) {
    s += fmt::format("count={}, counts hash={:#010x}) as collective #{}", count,
                     static_cast<std::uint32_t>(root), sequence);
    return s;
  }
  const char* what = kind == coll_kind::alltoall                               ? "count per peer"
                     : kind == coll_kind::gather || kind == coll_kind::scatter ? "count per rank"
                                                                               : "count";
  s += fmt::format("{}={}) as collective #{}", what, count, sequence);
  return s;
}

std::string_view check_mode_name(check_mode m) {
  switch (m) {
    case check_mode::off: return "off";
    case check_mode::stamp: return "stamp";
    case check_mode::full: return "full";
  }
  return "unknown";
}

check_mode check_mode_from_env() {
  static const check_mode value = [] {
    const auto v = env::text("RINGFLOW_CHECK");
    if (!v) return check_mode::stamp;
    // A switch (on is stamp), or a mode's name.
    if (const auto on = env::parse_switch(*v)) return *on ? check_mode::stamp : check_mode::off;
    if (env::iequals(*v, "stamp")) return check_mode::stamp;
    if (env::iequals(*v, "full")) return check_mode::full;
    env::report(env::malformed::warn, "RINGFLOW_CHECK", *v, "not valid",
                fmt::format("a switch ({}), stamp or full", env::switch_words), "stamp");
    return check_mode::stamp;
  }();
  return value;
}

namespace detail {
std::string stamp_mismatch_text(int me, const fingerprint& mine, int peer,
                                const fingerprint& theirs) {
  return fmt::format(
      "collective mismatch detected on rank {}: rank {} called {}; rank {} called {}. Every rank "
      "must call the same collective with the same type, op, count and root, in the same order "
      "(RINGFLOW_CHECK=full names every rank's call)",
      me, peer, theirs.describe(), me, mine.describe());
}
}  // namespace detail

}  // namespace ringflow
