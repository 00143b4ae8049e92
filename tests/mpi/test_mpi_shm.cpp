// The shared-memory allreduce under mpirun -np 1..5: every dtype and op against
// the serial reference and the ring, segment reuse, mismatches and timeouts.
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "ringflow/backends/local.hpp"
#include "ringflow/backends/mpi.hpp"
#include "ringflow/backends/shm.hpp"
#include "ringflow/coll/async.hpp"
#include "support/catch.hpp"
#include "support/coll_checks.hpp"
#include "support/collect.hpp"

using namespace ringflow;
using ringflow::testing::failures;
using ringflow::testing::require_none;

namespace {

// A fresh communicator whose segment's largest block is `block` bytes.
communicator with_block(const char* block) {
  // rank 0 reads RINGFLOW_SHM_BLOCK when the segment is created: small blocks
  // make many-block calls out of small buffers, and are quick to set up.
  testing::scoped_env env("RINGFLOW_SHM_BLOCK", block);
  communicator c = mpi::world();
  (void)shm::usable(c);  // creates the segment now, while the variable is set
  return c;
}

template <class T, class Op>
void check_shm(const communicator& c, std::size_t count, const Op& op, bool in_place,
               failures& out) {
  const int p = c.size(), r = c.rank();
  std::vector<T> in(count), res(count, static_cast<T>(-7));
  for (std::size_t i = 0; i < count; ++i)
    in[i] = static_cast<T>(testing::input_value(r, i, Op::kind));
  const std::vector<T> saved = in;
  if (in_place) {
    shm::allreduce(c, std::span<T>(in), op);
    res = in;
  } else {
    shm::allreduce(c, std::span<const T>(in), std::span<T>(res), op);
    // Compared bytewise (NaN != NaN); memcmp needs non-null pointers, so not for count 0.
    if (count != 0 && std::memcmp(in.data(), saved.data(), count * sizeof(T)) != 0) {
      out.push_back(fmt::format("rank {}: out-of-place shm allreduce modified its input", r));
    }
  }
  for (std::size_t i = 0; i < count; ++i) {
    const T want = testing::reference_value<T>(p, i, op);
    if (!testing::same_bits(res[i], want)) {
      out.push_back(fmt::format(
          "rank {} of {}: shm allreduce<{}, {}>(count={}, {}) element {} = "
          "{}, want {}",
          r, p, dtype_name(dtype_of<T>), op_name(Op::kind), count,
          in_place ? "in-place" : "out-of-place", i, testing::show(res[i]), testing::show(want)));
      return;
    }
  }
}

template <class T>
void check_ops(const communicator& c, const std::vector<std::size_t>& counts, failures& f) {
  for (std::size_t n : counts) {
    for (bool in_place : {false, true}) {
      check_shm<T>(c, n, sum, in_place, f);
      check_shm<T>(c, n, prod, in_place, f);
      check_shm<T>(c, n, min, in_place, f);
      check_shm<T>(c, n, max, in_place, f);
      check_shm<T>(c, n, avg, in_place, f);
    }
  }
}

std::vector<std::size_t> counts_for(int p) {
  // 0, 1, fewer than the ranks, odd sizes, and (with 4 KiB blocks) sizes of
  // several blocks that end mid-block.
  std::vector<std::size_t> v = testing::interesting_counts(p);
  v.push_back(3000);
  return v;
}

}  // namespace

TEST_CASE("shm: every dtype and op matches the serial reference", "[mpi][shm]") {
  communicator c = with_block("4K");
  REQUIRE(shm::usable(c));
  failures f;
  const auto counts = counts_for(c.size());
  check_ops<float>(c, counts, f);
  check_ops<double>(c, counts, f);
  check_ops<std::int8_t>(c, counts, f);
  check_ops<std::uint8_t>(c, counts, f);
  check_ops<std::int32_t>(c, counts, f);
  check_ops<std::int64_t>(c, counts, f);
  check_ops<half>(c, counts, f);
  check_ops<bfloat16>(c, counts, f);
  require_none(f);
}

// FNV-1a of a buffer's bytes: ranks compare results without shipping them.
std::uint64_t bits_hash(const void* data, std::size_t bytes) {
  const auto* p = static_cast<const unsigned char*>(data);
  std::uint64_t h = 1469598103934665603ull;
  for (std::size_t i = 0; i < bytes; ++i) h = (h ^ p[i]) * 1099511628211ull;
  return h;
}

TEST_CASE("shm: 10^6+3 elements, bit-identical to the ring, on every rank and run", "[mpi][shm]") {
  auto world = with_block("1M");  // 4 MB of floats: 4 blocks
  const std::size_t n = 1000003;
  failures f;
  check_shm<float>(world, n, sum, false, f);
  require_none(f);

  // Exact inputs: shm and ring give the same bits (on a tenth of the size:
  // the ring is slow with more ranks than cores).
  const std::size_t m = 100003;
  std::vector<float> a(m), b;
  for (std::size_t i = 0; i < m; ++i) {
    a[i] = static_cast<float>(testing::input_value(world.rank(), i, op_kind::avg));
  }
  b = a;
  shm::allreduce(world, std::span<float>(a), avg);
  allreduce(world, std::span<float>(b), avg, algo::ring);
  CHECK(std::memcmp(a.data(), b.data(), m * sizeof(float)) == 0);
  a.resize(n);

  // Inexact inputs: a rerun repeats the bits, and every rank holds the same.
  for (std::size_t i = 0; i < n; ++i) {
    a[i] = std::sin(static_cast<float>(i) * 0.37f + static_cast<float>(world.rank()) * 1.3f) * 1e3f;
  }
  b = a;
  shm::allreduce(world, std::span<float>(a), sum);
  shm::allreduce(world, std::span<float>(b), sum);
  CHECK(std::memcmp(a.data(), b.data(), n * sizeof(float)) == 0);
  const auto h = static_cast<std::int64_t>(bits_hash(a.data(), n * sizeof(float)));
  std::int64_t hs[2] = {h, ~h};  // ~ reverses the order: both maxima are ours only if all agree
  allreduce(world, std::span<std::int64_t>(hs), max);
  CHECK(hs[0] == h);
  CHECK(hs[1] == ~h);
  double want = 0;
  for (int r = 0; r < world.size(); ++r) {
    want += static_cast<double>(std::sin(7.0f * 0.37f + static_cast<float>(r) * 1.3f) * 1e3f);
  }
  CHECK(std::abs(a[7] - want) < 1e-3 * world.size());
}

TEST_CASE("shm: consecutive calls of changing sizes and types reuse the segment", "[mpi][shm]") {
  communicator c = with_block("64K");
  failures f;
  for (int round = 0; round < 2; ++round) {
    for (std::size_t n : {std::size_t{5000}, std::size_t{1}, std::size_t{70001}, std::size_t{3},
                          std::size_t{2048}, std::size_t{2049}}) {
      check_shm<float>(c, n, sum, round % 2 == 0, f);
      check_shm<half>(c, n + 1, max, true, f);
      check_shm<std::int64_t>(c, n * 2, avg, false, f);
      check_shm<std::uint8_t>(c, n + 5, min, true, f);
    }
  }
  require_none(f);
}

TEST_CASE("shm: sub-communicators get their own segments", "[mpi][shm]") {
  auto world = with_block("64K");
  communicator sub = world.split(world.rank() % 2, world.rank());
  {
    testing::scoped_env env("RINGFLOW_SHM_BLOCK", "64K");
    REQUIRE(shm::usable(sub));
  }
  std::vector<std::int32_t> v(10007, world.rank());
  shm::allreduce(sub, std::span(v), sum);
  std::int32_t want = 0;
  for (int r = world.rank() % 2; r < world.size(); r += 2) want += r;
  CHECK(v.front() == want);
  CHECK(v.back() == want);
  // The parent's segment is untouched by the child's.
  std::vector<float> w(999, 1.0f);
  shm::allreduce(world, std::span(w), sum);
  CHECK(w[998] == static_cast<float>(world.size()));
}

TEST_CASE("shm: ranks that disagree on the count get usage_error, then go on", "[mpi][shm]") {
  auto world = with_block("64K");
  world.set_checked(false);  // the shm path's own check, not the fingerprints
  if (world.size() < 2) return;
  std::vector<float> g(world.rank() == 1 ? 99 : 100, 1.0f);
  try {
    shm::allreduce(world, std::span<float>(g), sum);
    FAIL("expected usage_error");
  } catch (const usage_error& e) {
    const std::string msg = e.what();
    INFO(msg);
    CHECK(msg.find("count=99") != std::string::npos);
  }
  std::vector<float> h(5000, 2.0f);
  shm::allreduce(world, std::span<float>(h), sum);
  CHECK(h[4999] == 2.0f * static_cast<float>(world.size()));
}

TEST_CASE("shm: a rank that never arrives is a timeout_error naming it", "[mpi][shm]") {
  auto world = with_block("64K");
  world.set_checked(false);
  std::vector<float> g(1000, 1.0f);
  shm::allreduce(world, std::span<float>(g), sum);  // the segment exists everywhere
  // The timeout is provoked on purpose: throw only, do not end the job.
  mpi::set_abort_on_failure(false);
  struct restore {
    ~restore() { mpi::set_abort_on_failure(true); }
  } restore_policy;
  world.raw().set_timeout(std::chrono::milliseconds(200));
  if (world.size() >= 2 && world.rank() == 0) {
    try {
      shm::allreduce(world, std::span<float>(g), sum);  // rank 1 never comes
      FAIL("expected timeout_error");
    } catch (const timeout_error& e) {
      const std::string msg = e.what();
      INFO(msg);
      CHECK(msg.find("for rank 1") != std::string::npos);
    }
    // The segment's counters are lost: later calls fail at once, clearly.
    CHECK_THROWS_AS(shm::allreduce(world, std::span<float>(g), sum), comm_error);
  }
  mpi::world();  // a collective, so no rank leaves before rank 0 is done
}

TEST_CASE("shm: threads of the local backend are refused", "[mpi][shm]") {
  local::run(2, [](communicator& c) {
    if (shm::usable(c)) throw std::runtime_error("local backend reported usable");
    std::vector<float> v(4, 1.0f);
    try {
      shm::allreduce(c, std::span<float>(v), sum);
    } catch (const not_supported_error&) {
      return;
    }
    throw std::runtime_error("expected not_supported_error");
  });
}

TEST_CASE("shm: mismatched spans are usage errors", "[mpi][shm]") {
  auto world = mpi::world();
  std::vector<float> a(10), b(11);
  CHECK_THROWS_AS(shm::allreduce(world, std::span<const float>(a), std::span<float>(b), sum),
                  usage_error);
  CHECK_THROWS_AS(shm::allreduce(world, std::span<const float>(b.data(), 10),
                                 std::span<float>(b.data() + 1, 10), sum),
                  usage_error);
}

TEST_CASE("shm: ringflow::allreduce with algo::shm runs the shm path", "[mpi][shm]") {
  auto world = with_block("64K");
  failures f;
  for (std::size_t n : testing::interesting_counts(world.size())) {
    testing::check_allreduce<float>(world, n, sum, false, coll_options{algo::shm, 0}, f);
    testing::check_allreduce<bfloat16>(world, n, avg, true, coll_options{algo::shm, 0}, f);
    testing::check_allreduce<std::int64_t>(world, n, prod, false, coll_options{algo::shm, 0}, f);
  }
  require_none(f);
  // Threads cannot share a segment: coll/ reports the hook's refusal.
  local::run(2, [](communicator& c) {
    std::vector<float> v(4, 1.0f);
    try {
      allreduce(c, std::span<float>(v), sum, algo::shm);
    } catch (const not_supported_error&) {
      return;
    }
    throw std::runtime_error("expected not_supported_error");
  });
}

TEST_CASE("shm: async and blocking shm calls at once use separate segments", "[mpi][shm]") {
  testing::scoped_env env("RINGFLOW_SHM_BLOCK",
                          "64K");  // for the progress thread's duplicate as well
  auto world = mpi::world();
  std::vector<float> a(300001), b;
  for (std::size_t i = 0; i < a.size(); ++i) {
    a[i] = std::cos(static_cast<float>(i) * 0.01f + static_cast<float>(world.rank()));
  }
  b = a;
  auto h = allreduce_async(world, std::span(a), sum, coll_options{algo::shm, 0});
  allreduce(world, std::span(b), sum, algo::shm);
  h.wait();
  CHECK(std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);
}
