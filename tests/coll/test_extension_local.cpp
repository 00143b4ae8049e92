// The extension API (coll/extension.hpp): the ring_memory concept accepts
// the CPU policy and rejects an incomplete one; a collective of one's own,
// run through ext::collective_call and ext::ring_allreduce with a policy of
// one's own, gives the built-in ring's bits, is checked across ranks like a
// built-in collective, and shows in the flight record; ext::enqueue runs
// work in order on the progress thread and rethrows its error.
#include <fmt/ranges.h>

#include <atomic>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "ringflow/backends/local.hpp"
#include "ringflow/coll/collectives.hpp"
#include "ringflow/coll/extension.hpp"
#include "ringflow/comm/flight.hpp"
#include "support/catch.hpp"
#include "support/collect.hpp"

using namespace ringflow;
using ringflow::testing::failures;
using ringflow::testing::require_none;
using ringflow::testing::run_collecting;

namespace {

// The CPU policy, counting what the schedule asks of it.
struct counting_memory : ext::host_ring_memory {
  int sends = 0, reduces = 0;
  template <class T>
  void send(transport& t, const T* src, std::size_t n, int peer, int tag,
            std::vector<request>& out) {
    ++sends;
    ext::host_ring_memory::send(t, src, n, peer, tag, out);
  }
  template <class T, class Op>
  void reduce_received(std::size_t k, T* dst, const T* mine, std::size_t n, const Op& op) {
    ++reduces;
    ext::host_ring_memory::reduce_received(k, dst, mine, n, op);
  }
};

// Everything but land(): not a policy.
struct no_land {
  template <class T>
  void send(transport&, const T*, std::size_t, int, int, std::vector<request>&) {}
  void sources_read(std::vector<request>&) {}
  void complete(std::vector<request>&) {}
  std::size_t recv_depth() const { return 1; }
  template <class T>
  void open_slots(std::size_t, std::size_t) {}
  template <class T>
  void post_recv(transport&, std::size_t, std::size_t, int, int) {}
  template <class T, class Op>
  void reduce_received(std::size_t, T*, const T*, std::size_t, const Op&) {}
  template <class T, class Op>
  void finish(T*, std::size_t, const Op&, int) {}
  std::size_t gather_depth(std::size_t u) { return u; }
  template <class T>
  void post_gather(transport&, std::size_t, T*, std::size_t, int, int) {}
  template <class T>
  void forward(transport&, std::size_t, const T*, std::size_t, int, int, std::vector<request>&) {}
  template <class T>
  void copy(T*, const T*, std::size_t) {}
  template <class T>
  T* partial(std::size_t) {
    return nullptr;
  }
};

static_assert(ext::ring_memory<ext::host_ring_memory, float>);
static_assert(ext::ring_memory<ext::host_ring_memory, double>);
static_assert(ext::ring_memory<counting_memory, std::int32_t>);
static_assert(!ext::ring_memory<no_land, float>);
static_assert(!ext::ring_memory<int, float>);

std::vector<float> input_of(int rank, std::size_t n) {
  std::vector<float> v(n);
  for (std::size_t i = 0; i < n; ++i)
    v[i] = 0.1f * static_cast<float>(rank + 1) + 1e-3f * static_cast<float>(i % 97);
  return v;
}

}  // namespace

TEST_CASE("ext::ring_allreduce with a policy of one's own gives the ring's bits",
          "[coll][extension]") {
  for (const int p : {1, 3, 4}) {
    require_none(run_collecting(p, [&](communicator& c, failures& fl) {
      const std::size_t n = 10007;  // several segments, uneven chunks
      const std::size_t seg_bytes = 4096;
      const auto in = input_of(c.rank(), n);
      std::vector<float> mine(n), builtin(n);
      counting_memory m;
      {
        const ext::collective_call call(c, coll_kind::allreduce, dtype::f32, op_kind::sum, n);
        call.note_algorithm("counting_ring");
        ext::ring_allreduce(m, c.raw(), in.data(), mine.data(), n, sum_op{}, seg_bytes);
      }
      // The flight record names the collective and its algorithm, done.
      const auto rec = flight::recent(c.raw());
      if (flight::enabled() && (rec.empty() || rec.back().algorithm != "counting_ring" ||
                                rec.back().st != flight::state::done || rec.back().count != n)) {
        fl.push_back(
            fmt::format("rank {}: flight record not as run ({} records)", c.rank(), rec.size()));
      }
      allreduce<float>(c, std::span<const float>(in), std::span<float>(builtin), sum,
                       coll_options{algo::ring, seg_bytes});
      if (std::memcmp(mine.data(), builtin.data(), n * sizeof(float)) != 0) {
        fl.push_back(fmt::format("rank {} of {}: bits differ from the built-in ring", c.rank(), p));
      }
      if (p > 1 && (m.sends == 0 || m.reduces == 0)) {
        fl.push_back(fmt::format("rank {}: the policy was not used ({} sends, {} reduces)",
                                 c.rank(), m.sends, m.reduces));
      }
    }));
  }
}

TEST_CASE("ext::collective_call numbers, checks and records a collective", "[coll][extension]") {
  SECTION("sequence numbers are shared with the built-in collectives") {
    require_none(run_collecting(2, [](communicator& c, failures& fl) {
      std::vector<float> v(8, 1.0f);
      allreduce<float>(c, std::span<float>(v), sum);
      const ext::collective_call call(c, coll_kind::barrier, dtype::u8, op_kind::sum, 0);
      if (call.sequence() != 1) {
        fl.push_back(fmt::format("rank {}: sequence {}, expected 1", c.rank(), call.sequence()));
      }
    }));
  }
  SECTION("differing calls are a usage_error naming the ranks, under check_mode::full") {
    std::vector<std::string> errors(3);
    local::run(3, [&](communicator& c) {
      c.set_check_mode(check_mode::full);
      try {
        const ext::collective_call call(c, coll_kind::allreduce, dtype::f32, op_kind::sum,
                                        c.rank() == 2 ? 5 : 4);
      } catch (const usage_error& e) {
        errors[static_cast<std::size_t>(c.rank())] = e.what();
      }
    });
    for (const auto& e : errors) {
      CHECK(e.find("rank 2") != std::string::npos);
      CHECK(e.find("count") != std::string::npos);
    }
  }
}

TEST_CASE("ext::enqueue runs work in order on the progress thread and rethrows",
          "[coll][extension]") {
  require_none(run_collecting(2, [](communicator& c, failures& fl) {
    std::vector<int> order;
    std::vector<float> v(16, static_cast<float>(c.rank() + 1));
    auto a = allreduce_async<float>(c, std::span<float>(v), sum);
    auto b = ext::enqueue(c, [&order, &v](const communicator& dup) {
      order.push_back(static_cast<int>(v[0]));  // the allreduce before it is done
      std::vector<float> w(4, 1.0f);
      allreduce<float>(dup, std::span<float>(w), sum);
      order.push_back(static_cast<int>(w[0]));
    });
    auto bad = ext::enqueue(c, [](const communicator&) { throw std::runtime_error("boom"); });
    a.wait();
    b.wait();
    bool threw = false;
    try {
      bad.wait();
    } catch (const std::runtime_error& e) {
      threw = std::string(e.what()) == "boom";
    }
    if (order != std::vector<int>{3, 2}) {
      fl.push_back(fmt::format("rank {}: order {}", c.rank(), fmt::join(order, ",")));
    }
    if (!threw) fl.push_back(fmt::format("rank {}: the work's error was not rethrown", c.rank()));
  }));
}
