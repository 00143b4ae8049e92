// alltoall(v), gather(v), scatter(v), reduce, allgatherv and reduce_scatter_v
// over MPI (mpirun -np 1..5): the serial references, the matching MPI calls
// on the same inputs, bit identity, and full-check mismatches named on every
// rank (the communicator stays usable).
#include <mpi.h>

#include <numeric>

#include "ringflow/backends/mpi.hpp"
#include "ringflow/backends/mpi_interop.hpp"
#include "support/catch.hpp"
#include "support/coll_v_checks.hpp"
#include "support/collect.hpp"

using namespace ringflow;
using ringflow::testing::failures;
using ringflow::testing::require_none;

TEST_CASE("mpi: alltoall, gather, scatter, reduce and the v collectives match the reference",
          "[mpi][v]") {
  auto world = mpi::world();
  failures f;
  testing::check_v_suite<float>(world, f);
  testing::check_v_suite<std::int32_t>(world, f);
  testing::check_v_suite<double>(world, f);
  testing::check_v_suite<std::int64_t>(world, f);
  testing::check_v_suite<half>(world, f);
  testing::check_v_suite<bfloat16>(world, f);
  require_none(f);
}

TEST_CASE("mpi: reduce and reduce_scatter_v give the same bits on every rank and run",
          "[mpi][v][bit_identity]") {
  auto world = mpi::world();
  failures f;
  testing::check_v_identity_all_ops<float>(world, f);
  testing::check_v_identity_all_ops<double>(world, f);
  require_none(f);
}

TEST_CASE("mpi: sparse allreduce sums every rank's rows per index", "[mpi][v][sparse]") {
  auto world = mpi::world();
  failures f;
  for (int seed = 0; seed < 3; ++seed) {
    testing::check_sparse_allreduce<float>(world, seed, 3, f);
    testing::check_sparse_allreduce<std::int64_t>(world, seed, 2, f);
    // The dense fallback, and the packed path with a padded block (half rows of 5).
    testing::check_sparse_allreduce<float>(world, seed, 3, f, {41, sparse_reduction::dense});
    testing::check_sparse_allreduce<half>(world, seed, 5, f, {41, sparse_reduction::sparse});
  }
  require_none(f);
}

namespace {
std::vector<int> as_int(const std::vector<std::size_t>& v) {
  return std::vector<int>(v.begin(), v.end());
}

template <class T>
void same_as_mpi(const std::vector<T>& ours, const std::vector<T>& theirs, const char* what,
                 int rank, failures& f) {
  if (ours.size() != theirs.size()) {
    f.push_back(
        fmt::format("rank {}: {}: {} elements, MPI {}", rank, what, ours.size(), theirs.size()));
    return;
  }
  for (std::size_t i = 0; i < ours.size(); ++i) {
    if (!testing::same_bits(ours[i], theirs[i])) {
      f.push_back(fmt::format("rank {}: {}: element {} = {}, MPI has {}", rank, what, i,
                              testing::show(ours[i]), testing::show(theirs[i])));
      return;
    }
  }
}
}  // namespace

TEST_CASE("mpi: the new collectives agree with the matching MPI calls", "[mpi][v]") {
  auto world = mpi::world();
  MPI_Comm mc = mpi::native_handle(world);
  const int p = world.size(), r = world.rank();
  const auto up = static_cast<std::size_t>(p);
  failures f;
  for (int seed = 0; seed < 3; ++seed) {
    const std::size_t scale = seed == 2 ? 1009 : 2;
    // alltoall, both algorithms.
    for (alltoall_algo a : {alltoall_algo::pairwise, alltoall_algo::bruck}) {
      const std::size_t count = scale + 1;
      std::vector<float> in(up * count), ours(in.size()), theirs(in.size());
      for (std::size_t i = 0; i < in.size(); ++i)
        in[i] = static_cast<float>(r * 7919 + static_cast<int>(i));
      alltoall<float>(world, std::span<const float>(in), std::span<float>(ours),
                      alltoall_options{a});
      MPI_Alltoall(in.data(), static_cast<int>(count), MPI_FLOAT, theirs.data(),
                   static_cast<int>(count), MPI_FLOAT, mc);
      same_as_mpi(ours, theirs, "alltoall vs MPI_Alltoall", r, f);
    }
    // alltoallv.
    std::vector<std::size_t> sc(up), rc(up);
    for (int q = 0; q < p; ++q) {
      sc[q] = testing::uneven_count(r, q, seed, scale);
      rc[q] = testing::uneven_count(q, r, seed, scale);
    }
    const auto sd = detail::packed_displs(sc), rd = detail::packed_displs(rc);
    std::vector<std::int32_t> vin(std::accumulate(sc.begin(), sc.end(), std::size_t{0}));
    for (std::size_t i = 0; i < vin.size(); ++i) vin[i] = r * 100000 + static_cast<int>(i);
    const std::size_t rtotal = std::accumulate(rc.begin(), rc.end(), std::size_t{0});
    std::vector<std::int32_t> vours(rtotal), vtheirs(rtotal);
    alltoallv<std::int32_t>(world, std::span<const std::int32_t>(vin), sc, sd,
                            std::span<std::int32_t>(vours), rc, rd);
    const auto isc = as_int(sc), isd = as_int(sd), irc = as_int(rc), ird = as_int(rd);
    MPI_Alltoallv(vin.data(), isc.data(), isd.data(), MPI_INT, vtheirs.data(), irc.data(),
                  ird.data(), MPI_INT, mc);
    same_as_mpi(vours, vtheirs, "alltoallv vs MPI_Alltoallv", r, f);

    // gatherv / scatterv at root seed % p.
    const int root = seed % p;
    std::vector<std::size_t> counts(up);
    for (int q = 0; q < p; ++q) counts[q] = testing::uneven_count(q, root, seed, scale);
    const auto displs = detail::packed_displs(counts);
    const std::size_t total = std::accumulate(counts.begin(), counts.end(), std::size_t{0});
    const auto icounts = as_int(counts), idispls = as_int(displs);
    std::vector<double> mine(counts[r]);
    for (std::size_t j = 0; j < mine.size(); ++j) mine[j] = r + 0.25 * static_cast<double>(j);
    std::vector<double> gours(r == root ? total : 0), gtheirs(gours.size());
    gatherv<double>(world, std::span<const double>(mine), std::span<double>(gours), counts, displs,
                    root);
    MPI_Gatherv(mine.data(), static_cast<int>(mine.size()), MPI_DOUBLE, gtheirs.data(),
                icounts.data(), idispls.data(), MPI_DOUBLE, root, mc);
    same_as_mpi(gours, gtheirs, "gatherv vs MPI_Gatherv", r, f);
    std::vector<double> sin(r == root ? total : 0);
    for (std::size_t i = 0; i < sin.size(); ++i) sin[i] = 0.5 * static_cast<double>(i);
    std::vector<double> sours(counts[r]), stheirs(counts[r]);
    scatterv<double>(world, std::span<const double>(sin), counts, displs, std::span<double>(sours),
                     root);
    MPI_Scatterv(sin.data(), icounts.data(), idispls.data(), MPI_DOUBLE, stheirs.data(),
                 static_cast<int>(stheirs.size()), MPI_DOUBLE, root, mc);
    same_as_mpi(sours, stheirs, "scatterv vs MPI_Scatterv", r, f);

    // reduce (integers: exact in any order) with both algorithms.
    std::vector<std::int64_t> rin(scale * 3 + 1), rtheirs(rin.size());
    for (std::size_t i = 0; i < rin.size(); ++i)
      rin[i] = (r + 1) * static_cast<std::int64_t>(i % 13) - 5;
    for (algo a : {algo::tree, algo::ring}) {
      std::vector<std::int64_t> rours(r == root ? rin.size() : 0);
      reduce<std::int64_t>(world, std::span<const std::int64_t>(rin),
                           std::span<std::int64_t>(rours), sum, root, coll_options{a, 0});
      MPI_Reduce(rin.data(), r == root ? rtheirs.data() : nullptr, static_cast<int>(rin.size()),
                 MPI_INT64_T, MPI_SUM, root, mc);
      if (r == root) same_as_mpi(rours, rtheirs, "reduce vs MPI_Reduce", r, f);
    }

    // allgatherv and reduce_scatter_v with counts every rank agrees on.
    const auto agreed = testing::uneven_counts(p, seed, scale);
    const auto aoff = detail::packed_displs(agreed);
    const std::size_t atotal = std::accumulate(agreed.begin(), agreed.end(), std::size_t{0});
    const auto iagreed = as_int(agreed), iaoff = as_int(aoff);
    std::vector<float> piece(agreed[r]);
    for (std::size_t j = 0; j < piece.size(); ++j)
      piece[j] = static_cast<float>(r * 1000 + static_cast<int>(j));
    std::vector<float> aours(atotal), atheirs(atotal);
    allgatherv<float>(world, std::span<const float>(piece), std::span<float>(aours), agreed);
    MPI_Allgatherv(piece.data(), static_cast<int>(piece.size()), MPI_FLOAT, atheirs.data(),
                   iagreed.data(), iaoff.data(), MPI_FLOAT, mc);
    same_as_mpi(aours, atheirs, "allgatherv vs MPI_Allgatherv", r, f);
    std::vector<std::int32_t> rsin(atotal);
    for (std::size_t i = 0; i < atotal; ++i)
      rsin[i] = static_cast<std::int32_t>((i * 7 + static_cast<std::size_t>(r)) % 11);
    std::vector<std::int32_t> rsours(agreed[r]), rstheirs(agreed[r]);
    reduce_scatter_v<std::int32_t>(world, std::span<const std::int32_t>(rsin),
                                   std::span<std::int32_t>(rsours), agreed, max);
    MPI_Reduce_scatter(rsin.data(), rstheirs.data(), iagreed.data(), MPI_INT, MPI_MAX, mc);
    same_as_mpi(rsours, rstheirs, "reduce_scatter_v vs MPI_Reduce_scatter", r, f);
  }
  require_none(f);
}

TEST_CASE("mpi: full check names the rank whose alltoall, gather or allgatherv differs",
          "[mpi][v][checked]") {
  auto world = mpi::world();
  const int p = world.size(), r = world.rank();
  if (p < 2) return;
  const auto up = static_cast<std::size_t>(p);
  world.set_checked(true);
  auto expect_mismatch = [&](const char* what, const std::string& needle, auto&& fn) {
    try {
      fn();
      FAIL(what << ": no usage_error");
    } catch (const usage_error& e) {
      const std::string msg = e.what();
      INFO(what << ": " << msg);
      CHECK(msg.find(needle) != std::string::npos);
    }
  };
  expect_mismatch("alltoall count", "rank 1 called alltoall(type=float, count per peer=3)", [&] {
    const std::size_t count = r == 1 ? 3 : 2;
    std::vector<float> in(up * count), out(up * count);
    alltoall<float>(world, std::span<const float>(in), std::span<float>(out));
  });
  expect_mismatch("gather root", "rank 1 called gather(type=float, root=1, count per rank=4)", [&] {
    std::vector<float> in(4), out(up * 4);
    gather<float>(world, std::span<const float>(in), std::span<float>(out), r == 1 ? 1 : 0);
  });
  expect_mismatch("allgatherv counts", "counts hash=", [&] {
    std::vector<std::size_t> counts(up, 2);
    if (r == 1) counts[0] = 1, counts[1] = 3;
    std::vector<float> in(counts[r]), out(2 * up);
    allgatherv<float>(world, std::span<const float>(in), std::span<float>(out), counts);
  });
  expect_mismatch("reduce op", "rank 1 called reduce(type=double, op=max, root=0, count=5)", [&] {
    std::vector<double> in(5), out(5);
    if (r == 1) {
      reduce<double>(world, std::span<const double>(in), std::span<double>(out), max, 0);
    } else {
      reduce<double>(world, std::span<const double>(in), std::span<double>(out), sum, 0);
    }
  });
  // The communicator stays usable.
  world.set_check_mode(check_mode::stamp);
  std::vector<int> in(up, r), out(up);
  alltoall<int>(world, std::span<const int>(in), std::span<int>(out));
  for (int q = 0; q < p; ++q) CHECK(out[static_cast<std::size_t>(q)] == q);
}
