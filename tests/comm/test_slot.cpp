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

using namespace ringflow;

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
  local::run(3, [](communicator& c) {
    int made = 0;
    auto make = [&] {
      ++made;
      return std::make_shared<counter_state>();
    };
    REQUIRE(c.find_slot<counter_state>() == nullptr);
    counter_state& a = c.slot<counter_state>(make);
    a.value = c.rank() + 10;
    communicator copy = c;
    counter_state& b = copy.slot<counter_state>(make);
    REQUIRE(&a == &b);
    REQUIRE(b.value == c.rank() + 10);
    REQUIRE(made == 1);
    REQUIRE(copy.find_slot<counter_state>() == &a);

    // A split child is another communicator: its own state.
    communicator child = c.split(0, c.rank());
    REQUIRE(child.find_slot<counter_state>() == nullptr);
    REQUIRE(&child.slot<counter_state>(make) != &a);
    REQUIRE(made == 2);
  });
}

TEST_CASE("a make() that throws leaves the slot empty and the next call tries again", "[comm][slot]") {
  local::run(2, [](communicator& c) {
    REQUIRE_THROWS_AS(c.slot<counter_state>([]() -> std::shared_ptr<counter_state> {
      throw std::runtime_error("set-up failed");
    }),
                      std::runtime_error);
    REQUIRE(c.find_slot<counter_state>() == nullptr);
    REQUIRE(c.slot<counter_state>([] { return std::make_shared<counter_state>(); }).value == 0);
    REQUIRE_THROWS_AS(c.slot<first_kind>([] { return std::shared_ptr<first_kind>(); }), usage_error);
  });
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
  local::run(2, [](communicator& c) {
    std::vector<float> x(64, 1.0f);
    REQUIRE(c.find_slot<detail::comm_context>() == nullptr);
    allreduce(c, std::span(x), sum);
    const detail::comm_context* ctx = c.find_slot<detail::comm_context>();
    REQUIRE(ctx != nullptr);
    REQUIRE(detail::context_of(c) == ctx);
    REQUIRE(ctx->shape.ranks == 2);
    allreduce(c, std::span(x), sum);
    REQUIRE(c.find_slot<detail::comm_context>() == ctx);
    REQUIRE(x[0] == 4.0f);
  });
}
