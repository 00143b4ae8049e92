// data_parallel on the thread backend: bucket plans, averaged gradients, hooks, unused parameters,
// failures, timeline.
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <string>
#include <vector>

#include "ringflow/ad/autodiff.hpp"
#include "ringflow/backends/local.hpp"
#include "ringflow/coll/collectives.hpp"
#include "ringflow/train/data_parallel.hpp"
#include "ringflow/train/timeline.hpp"
#include "support/catch.hpp"
#include "support/noise.hpp"

using namespace ringflow;
namespace fs = std::filesystem;

namespace {

// Deterministic pseudo-random floats in [-1, 1).
using ringflow::testing::noise;

// A global batch of `n` samples with `features` inputs and 4 classes.
struct toy_batch {
  std::vector<float> x;
  std::vector<int> y;
};
toy_batch make_batch(std::size_t n, std::size_t features, std::uint64_t seed) {
  toy_batch b;
  b.x = noise(n * features, seed);
  for (std::size_t i = 0; i < n; ++i) b.y.push_back(static_cast<int>((i * 7 + seed) % 4));
  return b;
}

ad::tensor loss_on(ad::mlp& model, const toy_batch& b, std::size_t begin, std::size_t count,
                   std::size_t features) {
  auto x = ad::tensor::from_data(b.x.data() + begin * features,
                                 {static_cast<ad::index>(count), static_cast<ad::index>(features)});
  return ad::softmax_cross_entropy(model(x), std::span<const int>(b.y.data() + begin, count));
}

// Runs `body` on n thread-ranks; returns each rank's result (asserted on
// the main thread: Catch2 is not thread-safe).
template <class R, class Body>
std::vector<R> per_rank(int n, Body body) {
  std::vector<R> out(static_cast<std::size_t>(n));
  local::run(n, [&](communicator& c) { out[static_cast<std::size_t>(c.rank())] = body(c); });
  return out;
}

std::string temp_dir(const std::string& tag) {
  auto d = fs::temp_directory_path() / ("ringflow_test_" + tag + "_" + std::to_string(::getpid()));
  fs::remove_all(d);
  fs::create_directories(d);
  return d.string();
}

}  // namespace

TEST_CASE("plan_buckets: reverse order, contiguous slices, caps respected", "[train][buckets]") {
  ad::parameter_store<float> store;
  const std::vector<std::pair<std::string, ad::shape>> params = {
      {"a", ad::shape{100}},    {"b", ad::shape{10, 30}}, {"c", ad::shape{5}},
      {"d", ad::shape{64, 64}}, {"e", ad::shape{7}},      {"f", ad::shape{33, 3}}};
  for (const auto& [name, s] : params) store.add(name, s);

  for (std::size_t cap : {std::size_t{0}, std::size_t{64}, std::size_t{400}, std::size_t{1200},
                          std::size_t{100000}}) {
    for (std::size_t first : {std::size_t{0}, std::size_t{128}, cap}) {
      INFO("cap " << cap << " first " << first);
      const auto plan = train::plan_buckets(store, cap, first);
      REQUIRE(!plan.empty());
      std::size_t expect_param = store.size();
      std::size_t end = store.numel();  // buckets walk the buffer downwards
      for (std::size_t b = 0; b < plan.size(); ++b) {
        const auto& bk = plan[b];
        REQUIRE(bk.offset + bk.size == end);
        end = bk.offset;
        std::size_t sum = 0;
        for (std::size_t i : bk.params) {
          REQUIRE(i == --expect_param);  // reverse registration order, each once
          sum += store[i].size;
        }
        REQUIRE(sum == bk.size);
        const std::size_t limit = b == 0 ? first : cap;
        if (bk.params.size() > 1) REQUIRE(bk.bytes() <= limit);
        // Closed only when the next parameter would not fit.
        if (b + 1 < plan.size()) {
          const std::size_t next = plan[b + 1].params.front();
          REQUIRE(bk.bytes() + store[next].size * sizeof(float) > limit);
        }
      }
      REQUIRE(end == 0);
      REQUIRE(expect_param == 0);
    }
  }
  // Cap 0: one parameter per bucket.
  REQUIRE(train::plan_buckets(store, 0, 0).size() == store.size());
}

TEST_CASE("averaged gradient equals the single-process gradient of the whole batch",
          "[train][dp]") {
  const std::size_t features = 12, global = 24;
  const auto batch = make_batch(global, features, 5);
  // Reference: one process, the concatenated batch.
  ad::mlp ref({12, 16, 8, 4}, ad::activation::tanh, 3);
  auto ref_params = ref.parameters();
  ref.zero_grad();
  loss_on(ref, batch, 0, global, features).backward();
  const std::vector<float> want(ref_params.all_grads().begin(), ref_params.all_grads().end());

  for (int p : {1, 2, 3, 4}) {
    for (std::size_t cap : {std::size_t{0}, std::size_t{256}, train::default_bucket_cap_bytes}) {
      INFO("ranks " << p << " cap " << cap);
      const auto grads = per_rank<std::vector<float>>(p, [&](communicator& c) {
        // Other ranks start from other weights: the broadcast must fix that.
        ad::mlp model({12, 16, 8, 4}, ad::activation::tanh, c.rank() == 0 ? 3 : 100 + c.rank());
        train::data_parallel dp(c, model.parameters(),
                                {.bucket_cap_bytes = cap, .first_bucket_cap_bytes = cap / 2});
        const std::size_t local = global / static_cast<std::size_t>(c.size());
        model.zero_grad();
        dp.backward(
            loss_on(model, batch, local * static_cast<std::size_t>(c.rank()), local, features));
        dp.finish();
        auto g = model.parameters().all_grads();
        return std::vector<float>(g.begin(), g.end());
      });
      for (int r = 0; r < p; ++r) {
        const auto& g = grads[static_cast<std::size_t>(r)];
        REQUIRE(g.size() == want.size());
        for (std::size_t i = 0; i < g.size(); ++i) {
          if (std::abs(g[i] - want[i]) > 1e-5f) {
            FAIL("rank " << r << " element " << i << ": " << g[i] << " vs " << want[i]);
          }
        }
        // Every rank holds the same bits.
        REQUIRE(std::memcmp(g.data(), grads[0].data(), g.size() * sizeof(float)) == 0);
      }
    }
  }
}

TEST_CASE("hooks fire once per parameter per step; params stay bitwise identical", "[train][dp]") {
  struct result {
    std::vector<std::vector<std::uint32_t>> counts;
    std::vector<std::vector<float>> params_after_step;
    std::size_t buckets = 0;
    std::size_t launched_in_backward = 0;
  };
  const int p = 3;
  const std::size_t features = 10;
  const auto res = per_rank<result>(p, [&](communicator& c) {
    result out;
    ad::mlp model({10, 32, 32, 4}, ad::activation::relu, 7 + static_cast<unsigned>(c.rank()));
    train::data_parallel dp(c, model.parameters(),
                            {.bucket_cap_bytes = 2048, .first_bucket_cap_bytes = 256});
    ad::adamw opt(model.parameters(), {.lr = 1e-2});
    out.buckets = dp.buckets().size();
    for (int step = 0; step < 5; ++step) {
      const auto b = make_batch(
          8, features, 1000 * static_cast<unsigned>(step) + static_cast<unsigned>(c.rank()));
      opt.zero_grad();
      ad::tensor loss;
      {
        auto s = dp.span("forward");
        loss = loss_on(model, b, 0, 8, features);
      }
      dp.backward(loss);
      dp.step(opt);
      out.counts.push_back(dp.ready_counts());
      out.launched_in_backward = dp.last_step().buckets_launched_in_backward;
      auto v = model.parameters().all_values();
      out.params_after_step.emplace_back(v.begin(), v.end());
    }
    return out;
  });
  REQUIRE(res[0].buckets > 2);
  for (int r = 0; r < p; ++r) {
    const auto& mine = res[static_cast<std::size_t>(r)];
    // All hooks fired in backward, so every bucket launched before finish().
    REQUIRE(mine.launched_in_backward == mine.buckets);
    for (const auto& counts : mine.counts) {
      REQUIRE(counts.size() == 6);
      for (auto n : counts) REQUIRE(n == 1);
    }
    for (std::size_t s = 0; s < mine.params_after_step.size(); ++s) {
      const auto& a = mine.params_after_step[s];
      const auto& b = res[0].params_after_step[s];
      REQUIRE(a.size() == b.size());
      REQUIRE(std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);
    }
  }
}

namespace {
// A hand-built model: y = x W1 (+ x W2 on the ranks that use W2); W3 unused
// everywhere. Each parameter gets its own bucket with cap 0.
struct three_params {
  ad::parameter_store<float> store;
  ad::tensor w1, w2, w3;
  three_params() {
    w1 = store.add("w1", {3, 2});
    w2 = store.add("w2", {3, 2});
    w3 = store.add("w3", {3, 2});
    auto v = store.all_values();
    const auto n = noise(v.size(), 9);
    std::copy(n.begin(), n.end(), v.begin());
  }
};
}  // namespace

TEST_CASE("parameters unused on some ranks (or all) do not hang and average as zeros",
          "[train][dp][unused]") {
  for (std::size_t cap : {std::size_t{0}, std::size_t{1} << 20}) {
    for (int p : {2, 3, 4}) {
      INFO("ranks " << p << " cap " << cap);
      struct result {
        std::vector<float> grads;
        std::vector<std::uint32_t> counts;
        std::vector<float> want;
      };
      const auto res = per_rank<result>(p, [&](communicator& c) {
        three_params m;
        train::data_parallel dp(c, m.store,
                                {.bucket_cap_bytes = cap, .first_bucket_cap_bytes = cap});
        result out;
        // Two steps: the second checks that the unused slot is zeroed again
        // (not left holding last step's average).
        for (int step = 0; step < 2; ++step) {
          m.store.zero_grad();
          const bool uses_w2 = c.rank() % 2 == 0;
          if (step == 1) {
            // Stale values in the unused slots, which the trainer must zero.
            for (auto& g : m.store.all_grads()) g = 42.0f;
            m.w1.zero_grad();
            if (uses_w2) m.w2.zero_grad();
          }
          const auto x = noise(2 * 3, 50 + static_cast<unsigned>(c.rank()));
          auto xt = ad::tensor::from_data(x.data(), {2, 3});
          auto y = ad::matmul(xt, m.w1);
          if (uses_w2) y = y + ad::matmul(xt, m.w2);
          dp.backward(ad::sum(y));
          dp.finish();
        }
        out.counts = dp.ready_counts();
        auto g = m.store.all_grads();
        out.grads.assign(g.begin(), g.end());
        // Expected: d sum(x W)/dW[i][j] = sum over rows of x[:, i].
        const int n = c.size();
        out.want.assign(18, 0.0f);
        for (int r = 0; r < n; ++r) {
          const auto xr = noise(6, 50 + static_cast<unsigned>(r));
          for (int i = 0; i < 3; ++i) {
            const float col = xr[static_cast<std::size_t>(i)] + xr[static_cast<std::size_t>(3 + i)];
            for (int j = 0; j < 2; ++j) {
              out.want[static_cast<std::size_t>(i * 2 + j)] += col;
              if (r % 2 == 0) out.want[static_cast<std::size_t>(6 + i * 2 + j)] += col;
            }
          }
        }
        for (auto& w : out.want) w /= static_cast<float>(n);
        return out;
      });
      for (int r = 0; r < p; ++r) {
        const auto& mine = res[static_cast<std::size_t>(r)];
        REQUIRE(mine.counts == std::vector<std::uint32_t>{1u, r % 2 == 0 ? 1u : 0u, 0u});
        for (std::size_t i = 0; i < 18; ++i)
          REQUIRE(std::abs(mine.grads[i] - mine.want[i]) < 1e-5f);
        REQUIRE(std::memcmp(mine.grads.data(), res[0].grads.data(), 18 * sizeof(float)) == 0);
      }
    }
  }
}

TEST_CASE("a rank that skips backward entirely still matches the others' buckets",
          "[train][dp][unused]") {
  const auto res = per_rank<std::vector<float>>(3, [](communicator& c) {
    three_params m;
    train::data_parallel dp(c, m.store, {.bucket_cap_bytes = 0, .first_bucket_cap_bytes = 0});
    m.store.zero_grad();
    if (c.rank() != 1) {
      const std::vector<float> x(6, 1.0f);
      auto xt = ad::tensor::from_data(x.data(), {2, 3});
      dp.backward(ad::sum(ad::matmul(xt, m.w1) + ad::matmul(xt, m.w2) + ad::matmul(xt, m.w3)));
    }
    dp.finish();
    auto g = m.store.all_grads();
    return std::vector<float>(g.begin(), g.end());
  });
  for (const auto& g : res) {
    for (float v : g) REQUIRE(std::abs(v - 4.0f / 3.0f) < 1e-6f);
  }
}

TEST_CASE("a rank that throws makes the others fail with an error naming it, not hang",
          "[train][dp][errors]") {
  std::mutex m;
  std::vector<std::string> others;
  std::string thrown;
  try {
    local::run(3, [&](communicator& c) {
      ad::mlp model({6, 8, 4}, ad::activation::relu, 1);
      train::data_parallel dp(c, model.parameters(), {.bucket_cap_bytes = 0});
      ad::adamw opt(model.parameters());
      const auto b = make_batch(4, 6, static_cast<unsigned>(c.rank()));
      try {
        for (int step = 0; step < 3; ++step) {
          if (step == 1 && c.rank() == 1) throw std::runtime_error("rank 1 ran out of data");
          opt.zero_grad();
          auto logits = model(ad::tensor::from_data(b.x.data(), {4, 6}));
          dp.backward(ad::softmax_cross_entropy(logits, std::span<const int>(b.y)));
          dp.step(opt);
        }
      } catch (const std::exception& e) {
        if (c.rank() != 1) {
          std::lock_guard lock(m);
          others.push_back(e.what());
        }
        throw;
      }
    });
  } catch (const std::exception& e) {
    thrown = e.what();
  }
  REQUIRE(thrown == "rank 1 ran out of data");
  REQUIRE(others.size() == 2);
  for (const auto& msg : others) {
    INFO(msg);
    REQUIRE(msg.find("rank 1") != std::string::npos);
  }
}

TEST_CASE("usage errors: different models on the ranks, backward twice in one step",
          "[train][dp][errors]") {
  const auto errs = per_rank<std::string>(2, [](communicator& c) -> std::string {
    ad::mlp model({4, c.rank() == 0 ? 5 : 6, 2}, ad::activation::relu, 1);
    try {
      train::data_parallel dp(c, model.parameters());
    } catch (const usage_error& e) {
      return e.what();
    }
    return "";
  });
  for (const auto& e : errs) {
    INFO(e);
    REQUIRE(e.find("different models") != std::string::npos);
  }

  const auto twice = per_rank<std::string>(1, [](communicator& c) -> std::string {
    ad::mlp model({4, 5, 2}, ad::activation::relu, 1);
    train::data_parallel dp(c, model.parameters());
    const std::vector<float> x(8, 0.5f);
    auto loss = ad::sum(model(ad::tensor::from_data(x.data(), {2, 4})));
    dp.backward(loss);
    try {
      dp.backward(loss);
    } catch (const usage_error& e) {
      dp.finish();
      return e.what();
    }
    return "";
  });
  INFO(twice[0]);
  REQUIRE(twice[0].find("twice") != std::string::npos);
  REQUIRE(twice[0].find("rank 0") != std::string::npos);
}

TEST_CASE("timeline: per-rank Chrome trace files that parse, with every span",
          "[train][timeline]") {
  const fs::path dir = temp_dir("timeline");
  const fs::path path = dir / "trace.json";
  const int p = 2, steps = 3;
  std::vector<std::size_t> nbuckets(p);
  local::run(p, [&](communicator& c) {
    ad::mlp model({10, 32, 32, 4}, ad::activation::relu, 7);
    train::data_parallel dp(
        c, model.parameters(),
        {.bucket_cap_bytes = 2048, .first_bucket_cap_bytes = 256, .timeline_path = path});
    nbuckets[static_cast<std::size_t>(c.rank())] = dp.buckets().size();
    ad::adamw opt(model.parameters());
    const auto b = make_batch(8, 10, 3);
    for (int s = 0; s < steps; ++s) {
      opt.zero_grad();
      ad::tensor loss;
      {
        auto f = dp.span("forward");
        loss = loss_on(model, b, 0, 8, 10);
      }
      dp.backward(loss);
      dp.step(opt);
    }
  });  // the destructors write the files
  for (int r = 0; r < p; ++r) {
    const fs::path file = dir / ("trace.rank" + std::to_string(r) + ".json");
    REQUIRE(fs::exists(file));
    const auto events = train::read_trace(file);
    std::size_t fwd = 0, bwd = 0, opt = 0, ar = 0;
    for (const auto& e : events) {
      REQUIRE(e.rank == r);
      REQUIRE(e.duration_us >= 0);
      if (e.name == "forward") ++fwd;
      if (e.name == "backward") ++bwd;
      if (e.name == "optimizer") ++opt;
      if (e.name.rfind("allreduce bucket", 0) == 0) {
        ++ar;
        REQUIRE(e.lane == train::lane::comm);
        REQUIRE(e.bucket >= 0);
        REQUIRE(e.bytes > 0);
        REQUIRE(e.step >= 0);
        REQUIRE(e.step < steps);
      } else {
        REQUIRE(e.lane == train::lane::compute);
      }
    }
    REQUIRE(fwd == steps);
    REQUIRE(bwd == steps);
    REQUIRE(opt == steps);
    REQUIRE(ar == steps * nbuckets[static_cast<std::size_t>(r)]);
    const auto o = train::summarize_overlap(events);
    REQUIRE(o.steps == steps);
    REQUIRE(o.comm_us > 0);
    REQUIRE(o.hidden_fraction() >= 0.0);
    REQUIRE(o.hidden_fraction() <= 1.0);
  }
  fs::remove_all(dir);
}

TEST_CASE("timeline: rank_file, empty traces, invalid JSON is refused", "[train][timeline]") {
  REQUIRE(train::rank_file("trace.json", 3) == fs::path("trace.rank3.json"));
  REQUIRE(train::rank_file("out/run", 0) == fs::path("out/run.rank0.json"));
  const fs::path dir = temp_dir("timeline2");
  train::timeline empty(0, dir / "empty.json");
  empty.write();
  REQUIRE(train::read_trace(dir / "empty.rank0.json").empty());

  train::timeline named(1, dir / "named.json");
  named.record("a \"quoted\"\tname\\", train::lane::comm, 10.0, 25.5, 4);
  named.write();
  const auto evs = train::read_trace(dir / "named.rank1.json");
  REQUIRE(evs.size() == 1);
  REQUIRE(evs[0].name == "a \"quoted\"\tname\\");
  REQUIRE(std::abs(evs[0].duration_us - 15.5) < 1e-9);
  REQUIRE(evs[0].lane == train::lane::comm);

  for (const std::string bad : {"{\"traceEvents\":[", "{\"traceEvents\":[{\"ph\":\"X\",}]}",
                                "[1, 2]", "{\"traceEvents\":[]} x", "{\"a\":01}"}) {
    INFO(bad);
    { std::ofstream(dir / "bad.json") << bad; }
    REQUIRE_THROWS_AS(train::read_trace(dir / "bad.json"), error);
  }
  train::timeline off;
  REQUIRE_FALSE(off.enabled());
  off.record("x", train::lane::compute, 0, 1);
  REQUIRE(off.events().empty());
  fs::remove_all(dir);
}

TEST_CASE(
    "comm_hook: called once per bucket per step in bucket order; the default hook by hand "
    "gives the same bits",
    "[train][dp][hook]") {
  struct result {
    std::vector<std::vector<float>> params;
    std::vector<std::pair<std::int64_t, std::size_t>> calls;  // (step, bucket)
    std::vector<int> contributors;
    std::size_t buckets = 0;
  };
  const int p = 3;
  const std::size_t features = 10;
  auto train = [&](communicator& c, bool custom) {
    result out;
    ad::mlp model({10, 32, 32, 4}, ad::activation::relu, 7 + static_cast<unsigned>(c.rank()));
    train::data_parallel_options o{.bucket_cap_bytes = 2048, .first_bucket_cap_bytes = 256};
    if (custom) {
      // Runs on the progress thread; `out` is read only after the trainer is gone.
      const train::comm_hook_fn plain = train::allreduce_hook();
      o.comm_hook = [&out, plain](const train::bucket_view& v) {
        out.calls.emplace_back(v.step, v.index);
        out.contributors.push_back(v.contributors);
        plain(v);
      };
    }
    {
      train::data_parallel dp(c, model.parameters(), o);
      ad::sgd opt(model.parameters(), {.lr = 0.1f});
      out.buckets = dp.buckets().size();
      for (int step = 0; step < 3; ++step) {
        const auto b = make_batch(
            8, features, 100u * static_cast<unsigned>(step) + static_cast<unsigned>(c.rank()));
        opt.zero_grad();
        dp.backward(loss_on(model, b, 0, 8, features));
        dp.step(opt);
        auto v = model.parameters().all_values();
        out.params.emplace_back(v.begin(), v.end());
      }
    }
    return out;
  };
  const auto plain = per_rank<result>(p, [&](communicator& c) { return train(c, false); });
  const auto hooked = per_rank<result>(p, [&](communicator& c) { return train(c, true); });
  for (int r = 0; r < p; ++r) {
    const auto& h = hooked[static_cast<std::size_t>(r)];
    REQUIRE(h.calls.size() == 3 * h.buckets);
    for (std::size_t i = 0; i < h.calls.size(); ++i) {
      CHECK(h.calls[i].first == static_cast<std::int64_t>(i / h.buckets));
      CHECK(h.calls[i].second == i % h.buckets);
      CHECK(h.contributors[i] == p);
    }
    for (std::size_t s = 0; s < h.params.size(); ++s) {
      const auto& a = h.params[s];
      const auto& b = plain[static_cast<std::size_t>(r)].params[s];
      REQUIRE(a.size() == b.size());
      REQUIRE(std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);
    }
  }
}

TEST_CASE(
    "comm_hook: a hook that changes the reduction is what the trainer uses; a hook with "
    "compression is refused",
    "[train][dp][hook]") {
  const auto maxed = per_rank<std::vector<float>>(2, [](communicator& c) {
    ad::parameter_store<float> store;
    ad::tensor w = store.add("w", {4});
    train::data_parallel dp(c, store, {.comm_hook = [](const train::bucket_view& v) {
                              allreduce(v.comm, v.grads, ringflow::max);
                            }});
    // loss = sum(w * k): the gradient is k, different on each rank.
    const float k = c.rank() == 0 ? 1.0f : 5.0f;
    dp.backward(ad::sum(w * k));
    dp.finish();
    auto g = store.all_grads();
    return std::vector<float>(g.begin(), g.end());
  });
  for (const auto& g : maxed) REQUIRE(g == std::vector<float>(4, 5.0f));

  const auto refused = per_rank<int>(2, [](communicator& c) {
    ad::parameter_store<float> store;
    store.add("w", {4});
    try {
      train::data_parallel dp(c, store,
                              {.compress = "fp16", .comm_hook = [](const train::bucket_view&) {}});
    } catch (const usage_error&) {
      return 1;
    }
    return 0;
  });
  REQUIRE(refused == std::vector<int>{1, 1});
}
