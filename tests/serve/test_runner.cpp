// The batched runner: every client gets its own result, batches never exceed
// max_batch and form by size or deadline, a full queue refuses with
// overloaded_error, failures reach the futures, and stopping with requests in
// flight answers them all and returns.
#include <atomic>
#include <chrono>
#include <cstring>
#include <future>
#include <stdexcept>
#include <thread>
#include <vector>

#include "ringflow/ad/autodiff.hpp"
#include "ringflow/serve/runner.hpp"
#include "support/catch.hpp"
#include "support/noise.hpp"

using namespace ringflow;
namespace ad = ringflow::ad;
namespace sv = ringflow::serve;
using namespace std::chrono_literals;

namespace {

// y = (sum of x, first element * 2) per row.
void sum_and_double(const float* x, ad::index batch, float* y, ad::index in) {
  for (ad::index i = 0; i < batch; ++i) {
    float s = 0;
    for (ad::index k = 0; k < in; ++k) s += x[i * in + k];
    y[2 * i] = s;
    y[2 * i + 1] = 2 * x[i * in];
  }
}

// A batch function that blocks until open() (to hold the worker busy).
struct gate {
  std::promise<void> p;
  std::shared_future<void> f = p.get_future().share();
  std::atomic<int> entered{0};
  void open() { p.set_value(); }
  sv::batch_function fn() {
    return [this](const float* x, ad::index batch, float* y) {
      ++entered;
      f.wait();
      sum_and_double(x, batch, y, 3);
    };
  }
};

void wait_until(const std::function<bool()>& cond) {
  for (int i = 0; i < 20000 && !cond(); ++i) std::this_thread::sleep_for(1ms);
  REQUIRE(cond());
}

}  // namespace

TEST_CASE("each client gets its own result and batches stay within max_batch", "[serve][runner]") {
  const ad::index in = 5;
  sv::runner r([](const float* x, ad::index b, float* y) { sum_and_double(x, b, y, 5); }, in, 2,
               {.max_batch = 8, .max_wait = 200us, .max_queue = 1024});
  constexpr int clients = 6, per_client = 150;
  std::vector<std::thread> threads;
  std::atomic<int> wrong{0};
  for (int c = 0; c < clients; ++c) {
    threads.emplace_back([&, c] {
      std::vector<std::pair<std::future<std::vector<float>>, float>> pending;
      for (int i = 0; i < per_client; ++i) {
        const float id = static_cast<float>(c * 1000 + i);
        std::vector<float> x{id, 1, 2, 3, 4};
        pending.emplace_back(r.submit(x), id);
        if (pending.size() == 10 || i + 1 == per_client) {
          for (auto& [f, want] : pending) {
            const auto y = f.get();
            if (y.size() != 2 || y[0] != want + 10 || y[1] != 2 * want) ++wrong;
          }
          pending.clear();
        }
      }
    });
  }
  for (auto& t : threads) t.join();
  r.stop();
  CHECK(wrong == 0);
  const auto s = r.stats();
  CHECK(s.requests == static_cast<std::uint64_t>(clients * per_client));
  CHECK(s.requests_run == static_cast<std::uint64_t>(clients * per_client));
  CHECK(s.largest_batch <= 8);
  std::uint64_t counted = 0;
  for (std::size_t b = 0; b < s.batch_sizes.size(); ++b) counted += b * s.batch_sizes[b];
  CHECK(counted == s.requests);
  CHECK(s.batches >= s.requests / 8);
}

TEST_CASE("a batch runs when it is full, or when the oldest request's deadline passes",
          "[serve][runner]") {
  SECTION("full") {
    // A deadline far away: the batch runs as soon as the 8th request arrives.
    sv::runner r([](const float* x, ad::index b, float* y) { sum_and_double(x, b, y, 3); }, 3, 2,
                 {.max_batch = 8, .max_wait = 60s});
    std::vector<std::future<std::vector<float>>> fs;
    for (int i = 0; i < 8; ++i) fs.push_back(r.submit(std::vector<float>{float(i), 0, 0}));
    for (int i = 0; i < 8; ++i) CHECK(fs[static_cast<std::size_t>(i)].get()[0] == float(i));
    CHECK(r.stats().batch_sizes[8] == 1);
    CHECK(r.stats().batches == 1);
  }
  SECTION("deadline") {
    sv::runner r([](const float* x, ad::index b, float* y) { sum_and_double(x, b, y, 3); }, 3, 2,
                 {.max_batch = 64, .max_wait = 300ms});
    std::vector<std::future<std::vector<float>>> fs;
    for (int i = 0; i < 3; ++i) fs.push_back(r.submit(std::vector<float>{float(i), 1, 1}));
    for (int i = 0; i < 3; ++i) CHECK(fs[static_cast<std::size_t>(i)].get()[0] == float(i) + 2);
    CHECK(r.stats().batches == 1);
    CHECK(r.stats().batch_sizes[3] == 1);
  }
}

TEST_CASE("a full queue refuses with overloaded_error and memory stays bounded",
          "[serve][runner]") {
  gate g;
  sv::runner r(g.fn(), 3, 2, {.max_batch = 1, .max_wait = 0us, .max_queue = 4});
  std::vector<std::future<std::vector<float>>> fs;
  fs.push_back(r.submit(std::vector<float>{0, 0, 0}));
  wait_until([&] { return g.entered.load() == 1; });  // the worker holds request 0
  for (int i = 1; i <= 4; ++i) fs.push_back(r.submit(std::vector<float>{float(i), 0, 0}));
  CHECK(r.queued() == 4);
  try {
    r.submit(std::vector<float>{9, 9, 9});
    FAIL("a fifth waiting request was accepted");
  } catch (const sv::overloaded_error& e) {
    CHECK(std::string(e.what()).find("max_queue 4") != std::string::npos);
  }
  CHECK(r.stats().rejected == 1);
  g.open();
  for (int i = 0; i <= 4; ++i) CHECK(fs[static_cast<std::size_t>(i)].get()[0] == float(i));
  CHECK_THROWS_AS((r.submit(std::vector<float>{1, 2})), usage_error);  // wrong size
}

TEST_CASE("a model that throws fails its batch's futures, and the runner goes on",
          "[serve][runner]") {
  sv::runner r(
      [](const float* x, ad::index b, float* y) {
        for (ad::index i = 0; i < b; ++i) {
          if (x[i * 2] < 0) throw std::runtime_error("negative input");
        }
        for (ad::index i = 0; i < b; ++i) y[i] = x[i * 2];
      },
      2, 1, {.max_batch = 1});
  auto bad = r.submit(std::vector<float>{-1, 0});
  CHECK_THROWS_WITH(bad.get(), "negative input");
  const auto five = r.submit(std::vector<float>{5, 0}).get();
  CHECK(five[0] == 5.0f);
}

TEST_CASE("stopping with requests in flight answers them all and returns", "[serve][runner]") {
  gate g;
  auto r = std::make_unique<sv::runner>(g.fn(), 3, 2,
                                        sv::runner_options{.max_batch = 2, .max_wait = 0us});
  std::vector<std::future<std::vector<float>>> fs;
  for (int i = 0; i < 7; ++i) fs.push_back(r->submit(std::vector<float>{float(i), 0, 0}));
  wait_until([&] { return g.entered.load() == 1; });
  auto stopper = std::async(std::launch::async, [&] { r->stop(); });
  // stop() waits for the accepted requests; new ones are refused meanwhile
  // (those that came before stop() began are accepted and answered too).
  std::vector<std::future<std::vector<float>>> early;
  wait_until([&] {
    try {
      early.push_back(r->submit(std::vector<float>{5, 0, 0}));
      return false;
    } catch (const sv::runner_stopped_error&) {
      return true;
    }
  });
  g.open();
  stopper.get();
  for (int i = 0; i < 7; ++i) CHECK(fs[static_cast<std::size_t>(i)].get()[0] == float(i));
  for (auto& f : early) CHECK(f.get()[0] == 5.0f);
  r.reset();  // the destructor after stop() is a no-op

  // The destructor alone, with requests still queued, also answers them.
  std::vector<std::future<std::vector<float>>> more;
  {
    sv::runner r2(
        [](const float* x, ad::index b, float* y) {
          std::this_thread::sleep_for(2ms);
          sum_and_double(x, b, y, 3);
        },
        3, 2, {.max_batch = 4, .max_wait = 1ms});
    for (int i = 0; i < 20; ++i) more.push_back(r2.submit(std::vector<float>{float(i), 0, 0}));
  }
  for (int i = 0; i < 20; ++i) CHECK(more[static_cast<std::size_t>(i)].get()[1] == 2.0f * float(i));
}

TEST_CASE("a runner over an int8 model answers like the model, bit for bit", "[serve][runner]") {
  ad::mlp net({20, 16, 4}, ad::activation::relu, 3);
  const auto fp32 = sv::model::from_sequential(net);
  const auto x = testing::noise(64 * 20, 5);
  auto m = std::make_shared<const sv::model>(sv::quantize(fp32, x.data(), 64));
  sv::runner r(m, {.max_batch = 16, .max_wait = 500us});
  std::vector<std::future<std::vector<float>>> fs;
  for (int i = 0; i < 64; ++i) {
    fs.push_back(r.submit(std::span<const float>(x.data() + i * 20, 20)));
  }
  for (int i = 0; i < 64; ++i) {
    const auto got = fs[static_cast<std::size_t>(i)].get();
    const auto want = m->forward(std::span<const float>(x.data() + i * 20, 20), 1);
    REQUIRE(got.size() == want.size());
    CHECK(std::memcmp(got.data(), want.data(), got.size() * sizeof(float)) == 0);
  }
  const auto rep = sv::run_load(r, x.data(), 64, {.clients = 2, .in_flight = 4, .duration = 100ms});
  CHECK(rep.completed > 0);
  CHECK(rep.p50_us <= rep.p99_us);
  CHECK(rep.mean_batch >= 1.0);
}
