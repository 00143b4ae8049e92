// communicator::slot: one T per communicator, shared by copies, made once,
// kept apart from other communicators, destroyed with the last copy and in
// reverse order of making.
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "ringflow/backends/local.hpp"
#include "ringflow/coll/collectives.hpp"
#include "ringflow/coll/context.hpp"
#include "support/catch.hpp"
#include "support/collect.hpp"

using namespace ringflow;
using ringflow::testing::failures;
using ringflow::testing::require_none;
using ringflow::testing::run_collecting;

// Rank threads must not call Catch2's assertions (they are not thread-safe):
// they record what went wrong and the test thread asserts.
#define SLOT_EXPECT(cond)                                                        \
  do {                                                                           \
    if (!(cond)) out.push_back("rank " + std::to_string(c.rank()) + ": " #cond); \
  } while (0)

namespace {
struct counter_state {
  int value = 0;
};
struct logged {
  std::vector<std::string>* log = nullptr;
  std::string name;
  ~logged() {
    if (log != nullptr) log->push_back(name);
  }
};
template <class T>
std::shared_ptr<T> make_logged(std::vector<std::string>& log, std::string name) {
  auto p = std::make_shared<T>();
  p->log = &log;
  p->name = std::move(name);
  return p;
}
struct first_kind : logged {};
struct second_kind : logged {};
}  // namespace

TEST_CASE("a slot is made once per communicator and shared by its copies", "[comm][slot]") {
  require_none(run_collecting(3, [](communicator& c, failures& out) {
    int made = 0;
    auto make = [&] {
      ++made;
      return std::make_shared<counter_state>();
    };
    SLOT_EXPECT(c.find_slot<counter_state>() == nullptr);
    counter_state& a = c.slot<counter_state>(make);
    a.value = c.rank() + 10;
    communicator copy = c;
    counter_state& b = copy.slot<counter_state>(make);
    SLOT_EXPECT(&a == &b);
    SLOT_EXPECT(b.value == c.rank() + 10);
    SLOT_EXPECT(made == 1);
    SLOT_EXPECT(copy.find_slot<counter_state>() == &a);

    // A split child is another communicator: its own state.
    communicator child = c.split(0, c.rank());
    SLOT_EXPECT(child.find_slot<counter_state>() == nullptr);
    SLOT_EXPECT(&child.slot<counter_state>(make) != &a);
    SLOT_EXPECT(made == 2);
  }));
}

TEST_CASE("a make() that throws leaves the slot empty and the next call tries again",
          "[comm][slot]") {
  require_none(run_collecting(2, [](communicator& c, failures& out) {
    bool threw = false;
    try {
      c.slot<counter_state>(
          []() -> std::shared_ptr<counter_state> { throw std::runtime_error("set-up failed"); });
    } catch (const std::runtime_error&) {
      threw = true;
    }
    SLOT_EXPECT(threw);
    SLOT_EXPECT(c.find_slot<counter_state>() == nullptr);
    SLOT_EXPECT(c.slot<counter_state>([] { return std::make_shared<counter_state>(); }).value == 0);
    bool null_refused = false;
    try {
      c.slot<first_kind>([] { return std::shared_ptr<first_kind>(); });
    } catch (const usage_error&) {
      null_refused = true;
    }
    SLOT_EXPECT(null_refused);
  }));
}

TEST_CASE("slots die with the last copy, later ones first, and make() may use other slots",
          "[comm][slot]") {
  std::vector<std::string> log;
  {
    auto comms = local::make_group(1);
    communicator c = comms[0];
    c.slot<second_kind>([&] {
      // Making one slot may make another (shm's set-up inside the context's).
      c.slot<first_kind>([&] { return make_logged<first_kind>(log, "first"); });
      return make_logged<second_kind>(log, "second");
    });
    communicator copy = c;
    comms.clear();
    c = communicator();
    REQUIRE(log.empty());
  }
  // first_kind finished making first, so it is destroyed last.
  REQUIRE(log == std::vector<std::string>{"second", "first"});
}

TEST_CASE("the tuning context lives in the communicator's slot", "[comm][slot]") {
  require_none(run_collecting(2, [](communicator& c, failures& out) {
    std::vector<float> x(64, 1.0f);
    SLOT_EXPECT(c.find_slot<detail::comm_context>() == nullptr);
    allreduce(c, std::span(x), sum);
    const detail::comm_context* ctx = c.find_slot<detail::comm_context>();
    SLOT_EXPECT(ctx != nullptr);
    if (ctx == nullptr) return;
    SLOT_EXPECT(detail::context_of(c) == ctx);
    SLOT_EXPECT(ctx->shape.ranks == 2);
    allreduce(c, std::span(x), sum);
    SLOT_EXPECT(c.find_slot<detail::comm_context>() == ctx);
    SLOT_EXPECT(x[0] == 4.0f);
  }));
}
