// Test plumbing shared by the collective tests: run thread ranks and collect
// their failures, assert on the main thread, and set an environment variable
// for one scope. (Catch2 assertions are not thread-safe, so rank threads
// record failures and only the test thread asserts.)
#pragma once

#include <cstdlib>
#include <mutex>
#include <string>

#include "ringflow/backends/local.hpp"
#include "support/catch.hpp"
#include "support/coll_checks.hpp"

namespace ringflow::testing {

/// Runs `body(comm, failures&)` on n thread-ranks; returns every rank's failures.
template <class Body>
failures run_collecting(int n, Body body) {
  std::mutex m;
  failures all;
  local::run(n, [&](communicator& c) {
    failures mine;
    body(c, mine);
    std::lock_guard lock(m);
    all.insert(all.end(), mine.begin(), mine.end());
  });
  return all;
}

/// Fails the test (on the calling thread) if any failure was recorded,
/// showing the first ten.
inline void require_none(const failures& f) {
  for (std::size_t i = 0; i < f.size() && i < 10; ++i) UNSCOPED_INFO(f[i]);
  REQUIRE(f.empty());
}

/// Sets (or, with nullptr, unsets) an environment variable for one scope and
/// restores the previous state afterwards. Thread ranks share the process
/// environment, so they all see it.
class scoped_env {
 public:
  scoped_env(const char* name, const char* value) : name_(name) {
    if (const char* old = std::getenv(name)) old_ = old, had_ = true;
    if (value) {
      setenv(name, value, 1);
    } else {
      unsetenv(name);
    }
  }
  ~scoped_env() {
    if (had_) {
      setenv(name_, old_.c_str(), 1);
    } else {
      unsetenv(name_);
    }
  }
  scoped_env(const scoped_env&) = delete;
  scoped_env& operator=(const scoped_env&) = delete;

 private:
  const char* name_;
  std::string old_;
  bool had_ = false;
};

}  // namespace ringflow::testing
