// ps::node on thread ranks: layout and bad input, sync == allreduce-average
// SGD, the SSP bound, async record/replay bit for bit, dropped workers, a
// lost server (no hang), and the Chrome trace of pushes, pulls and applies.
#include <unistd.h>

#include <atomic>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#include "ringflow/ad/optim.hpp"
#include "ringflow/ad/parameter_store.hpp"
#include "ringflow/backends/local.hpp"
#include "ringflow/coll/collectives.hpp"
#include "ringflow/ps/parameter_server.hpp"
#include "ringflow/train/timeline.hpp"
#include "support/catch.hpp"
#include "support/collect.hpp"

using namespace ringflow;
using ringflow::testing::failures;
using ringflow::testing::require_none;
using ringflow::testing::run_collecting;
using ringflow::testing::scoped_env;
namespace fs = std::filesystem;

namespace {

std::vector<float> initial_params(std::size_t n) {
  std::vector<float> v(n);
  for (std::size_t i = 0; i < n; ++i) v[i] = std::sin(0.37f * static_cast<float>(i)) * 0.5f;
  return v;
}

// A worker's gradient: a deterministic function of what it pulled, the
// worker and the step (a replayed run computes the same bits).
void gradient(std::span<const float> p, int worker, std::int64_t step, std::span<float> g) {
  for (std::size_t i = 0; i < p.size(); ++i) {
    g[i] = 0.3f * p[i] - 0.1f * std::cos(0.01f * static_cast<float>(i * (worker + 1)) +
                                         0.2f * static_cast<float>(step));
  }
}

// Some compute that takes longer for a slowed worker (no sleeps).
float busy_work(int units) {
  volatile float x = 0;
  for (int i = 0; i < units * 20000; ++i) x = x + std::sin(static_cast<float>(i));
  return x;
}

// Runs a worker loop: pull, (gradient, push, pull) x steps, finish.
void work(ps::node& n, std::vector<float>& params, int steps, int slow_units = 0) {
  std::vector<float> g(params.size());
  n.pull(params).wait();
  for (int t = 0; t < steps; ++t) {
    if (slow_units > 0) busy_work(slow_units);
    gradient(params, n.worker_index(), t, g);
    n.push(g).wait();
    n.pull(params).wait();
  }
  n.finish();
}

// The allreduce reference: W thread ranks average their gradients with
// allreduce and step ad::sgd on their own copy.
std::vector<float> allreduce_reference(int W, std::size_t numel, int steps, ad::sgd_options o) {
  std::vector<float> result;
  std::mutex m;
  local::run(W, [&](communicator& c) {
    ad::parameter_store<float> store;
    store.add("p", ad::shape{static_cast<ad::index>(numel)});
    const auto init = initial_params(numel);
    std::copy(init.begin(), init.end(), store.all_values().begin());
    ad::sgd opt(store, o);
    for (int t = 0; t < steps; ++t) {
      gradient(store.all_values(), c.rank(), t, store.all_grads());
      allreduce(c, store.all_grads(), avg);
      opt.step();
    }
    if (c.rank() == 0) {
      std::lock_guard lock(m);
      result.assign(store.all_values().begin(), store.all_values().end());
    }
  });
  return result;
}

struct job_result {
  std::vector<float> params;  // gathered at the end (rank 0's copy)
  std::vector<ps::server_stats> stats;
  failures errors;
};

// One ps job on `ranks` thread ranks; `worker_body` replaces work() when set.
// gather = false: no closing collective (a rank that "dies" just returns).
template <class Body>
job_result run_job(int ranks, std::size_t numel, ps::options o, Body worker_body,
                   bool gather = true) {
  job_result r;
  std::mutex m;
  r.errors = run_collecting(ranks, [&](communicator& c, failures& f) {
    const auto init = initial_params(numel);
    ps::node n(c, init, o);
    std::vector<float> params = init;
    try {
      if (n.is_worker()) worker_body(n, params);
      if (n.is_server() && !n.is_worker()) n.serve();
    } catch (const std::exception& e) {
      f.push_back(fmt::format("rank {}: {}", c.rank(), e.what()));
      return;
    }
    if (gather) n.gather_parameters(params);
    std::lock_guard lock(m);
    if (n.is_server()) r.stats.push_back(n.stats());
    if (c.rank() == 0) r.params = params;
  });
  std::sort(r.stats.begin(), r.stats.end(),
            [](const auto& a, const auto& b) { return a.server < b.server; });
  return r;
}

}  // namespace

TEST_CASE("ps layout: balanced shards and clear errors for bad input", "[ps]") {
  ps::options o;
  o.servers = 2;
  ps::layout l(10, 5, o);
  CHECK(l.servers() == 2);
  CHECK(l.workers() == 3);
  CHECK(l.shard(0).begin == 0);
  CHECK(l.shard(0).end == 5);
  CHECK(l.shard(1).end == 10);
  CHECK(l.worker_rank(0) == 2);
  CHECK(l.worker_index(1) == -1);
  o.servers = 5;
  CHECK_THROWS_WITH(
      ps::layout(10, 5, o, 3),
      Catch::Contains("rank 3") && Catch::Contains("5 dedicated server(s) do not fit 5"));
  o.servers = 2;
  CHECK_THROWS_WITH(ps::layout(1, 5, o), Catch::Contains("cannot be split over 2 servers"));
  o.where = ps::placement::colocated;
  ps::layout co(7, 3, o);
  CHECK(co.servers() == 3);
  CHECK(co.workers() == 3);
  CHECK(co.worker_rank(2) == 2);
  CHECK(ps::parse_consistency("ssp") == ps::consistency::ssp);
  CHECK_THROWS_WITH(ps::parse_consistency("eventual"), Catch::Contains("unknown consistency"));
}

TEST_CASE("ps: wrong buffer sizes name the rank and the sizes", "[ps]") {
  const auto f = run_collecting(2, [](communicator& c, failures& fail) {
    const auto init = initial_params(16);
    ps::node n(c, init, {.servers = 1});
    if (n.is_worker()) {
      std::vector<float> small(5);
      try {
        n.push(small).wait();
        fail.push_back("push of a wrong size did not throw");
      } catch (const usage_error& e) {
        if (std::string(e.what()).find("rank 1") == std::string::npos ||
            std::string(e.what()).find("5 floats, the servers hold 16") == std::string::npos) {
          fail.push_back(std::string("unclear error: ") + e.what());
        }
      }
      n.finish();
    } else {
      n.serve();
    }
  });
  require_none(f);
}

TEST_CASE("ps sync equals allreduce-average SGD (dedicated and colocated)", "[ps]") {
  const ad::sgd_options sgd{.lr = 0.1, .momentum = 0.9};
  const int steps = 12;
  const std::size_t numel = 103;
  struct setup {
    int ranks;
    ps::placement where;
    int servers;
  };
  for (const setup s :
       {setup{4, ps::placement::dedicated, 1}, setup{5, ps::placement::dedicated, 2},
        setup{3, ps::placement::colocated, 0}}) {
    INFO("ranks " << s.ranks << " servers " << s.servers << " colocated "
                  << (s.where == ps::placement::colocated));
    ps::options o{.mode = ps::consistency::sync, .where = s.where, .servers = s.servers};
    o.optimizer.sgd = sgd;
    const auto r =
        run_job(s.ranks, numel, o, [&](ps::node& n, std::vector<float>& p) { work(n, p, steps); });
    require_none(r.errors);
    const int W = ps::layout(numel, s.ranks, o).workers();
    const auto ref = allreduce_reference(W, numel, steps, sgd);
    REQUIRE(r.params.size() == ref.size());
    double worst = 0;
    for (std::size_t i = 0; i < ref.size(); ++i) {
      worst = std::max(worst, static_cast<double>(std::abs(r.params[i] - ref[i])));
    }
    CHECK(worst <= 1e-6);
    for (const auto& st : r.stats) {
      CHECK(st.updates == static_cast<std::uint64_t>(steps));
      CHECK(st.staleness[0] == static_cast<std::uint64_t>(steps * W));
    }
  }
}

TEST_CASE("ps SSP: no worker is more than s pushes ahead of the slowest", "[ps]") {
  for (int s : {0, 2}) {
    INFO("staleness " << s);
    const int W = 3, steps = 10;
    std::vector<std::atomic<std::int64_t>> clocks(W);
    std::vector<std::atomic<bool>> done(W);
    for (auto& c : clocks) c = 0;
    for (auto& d : done) d = false;
    std::mutex m;
    failures seen;
    ps::options o{.mode = ps::consistency::ssp, .servers = 1, .staleness = s};
    const auto r = run_job(W + 1, 64, o, [&](ps::node& n, std::vector<float>& p) {
      const int w = n.worker_index();
      std::vector<float> g(p.size());
      n.pull(p).wait();
      for (int t = 0; t < steps; ++t) {
        if (w == 0) busy_work(4);  // the slowed worker
        gradient(p, w, t, g);
        ++clocks[static_cast<std::size_t>(w)];  // before the push: never behind the server's count
        n.push(g).wait();
        n.pull(p).wait();
        const std::int64_t mine = clocks[static_cast<std::size_t>(w)].load();
        for (int j = 0; j < W; ++j) {
          if (done[static_cast<std::size_t>(j)].load()) continue;
          const std::int64_t theirs = clocks[static_cast<std::size_t>(j)].load();
          if (mine - theirs > s) {
            std::lock_guard lock(m);
            seen.push_back(fmt::format("worker {} at {} passed worker {} at {} (s = {})", w, mine,
                                       j, theirs, s));
          }
        }
      }
      done[static_cast<std::size_t>(w)] = true;
      n.finish();
    });
    require_none(r.errors);
    require_none(seen);
    REQUIRE(r.stats.size() == 1);
    CHECK(r.stats[0].max_clock_gap <= s);
    CHECK(r.stats[0].updates == static_cast<std::uint64_t>(W * steps));
  }
}

TEST_CASE("ps async: replaying the record reproduces the parameters bit for bit", "[ps]") {
  const int steps = 8;
  const std::size_t numel = 77;
  ps::options o{.mode = ps::consistency::async, .servers = 2};
  o.optimizer.type = ps::optimizer_options::kind::adamw;
  o.optimizer.adamw.lr = 0.01;
  const auto body = [&](ps::node& n, std::vector<float>& p) {
    work(n, p, steps, n.worker_index() == 1 ? 2 : 0);
  };
  const auto live = run_job(5, numel, o, body);
  require_none(live.errors);
  REQUIRE(live.stats.size() == 2);
  ps::replay_record record;
  for (const auto& st : live.stats) {
    CHECK(st.updates == static_cast<std::uint64_t>(3 * steps));
    record.servers.push_back(st.record);
  }
  ps::options again = o;
  again.replay = &record;
  const auto replayed = run_job(5, numel, again, body);
  require_none(replayed.errors);
  REQUIRE(replayed.params.size() == live.params.size());
  CHECK(std::memcmp(replayed.params.data(), live.params.data(), numel * sizeof(float)) == 0);
  for (std::size_t s = 0; s < 2; ++s) CHECK(replayed.stats[s].record == live.stats[s].record);
}

TEST_CASE("ps: a worker that dies or leaves early is dropped, the rest finish", "[ps]") {
  for (auto mode : {ps::consistency::sync, ps::consistency::async}) {
    INFO("mode " << ps::to_string(mode));
    ps::options o{.mode = mode, .servers = 1};
    const auto r = run_job(
        4, 32, o,
        [&](ps::node& n, std::vector<float>& p) {
          const int w = n.worker_index();
          std::vector<float> g(p.size());
          n.pull(p).wait();
          for (int t = 0; t < 10; ++t) {
            if (w == 0 && t == 3) return;  // dies: no goodbye
            if (w == 1 && t == 5) break;   // leaves early: says goodbye
            gradient(p, w, t, g);
            n.push(g).wait();
            n.pull(p).wait();
          }
          n.finish();
        },
        /*gather=*/false);
    require_none(r.errors);
    REQUIRE(r.stats.size() == 1);
    const auto& st = r.stats[0];
    REQUIRE(st.dropped == std::vector<int>{1});  // worker 0 is rank 1
    CHECK(st.drop_reasons[0].find("rank 1") != std::string::npos);
    CHECK(std::find(st.finished.begin(), st.finished.end(), 2) != st.finished.end());
    CHECK(st.pushes_by_worker[0] == 3);
    CHECK(st.pushes_by_worker[1] == 5);
    CHECK(st.pushes_by_worker[2] == 10);
  }
}

TEST_CASE("ps: a silent worker is dropped after worker_timeout", "[ps]") {
  std::atomic<bool> served{false};
  ps::options o{.mode = ps::consistency::sync, .servers = 1};
  o.worker_timeout = std::chrono::milliseconds(300);
  std::vector<ps::server_stats> stats;
  const auto f = run_collecting(3, [&](communicator& c, failures& fail) {
    const auto init = initial_params(20);
    ps::node n(c, init, o);
    std::vector<float> p = init;
    if (n.is_server()) {
      stats.push_back(n.serve());
      served = true;
      return;
    }
    if (n.worker_index() == 0) {
      n.pull(p).wait();
      // Stuck (alive, silent) until the server has finished without it.
      while (!served.load()) std::this_thread::yield();
      return;
    }
    try {
      work(n, p, 6);
    } catch (const std::exception& e) {
      fail.push_back(e.what());
    }
  });
  require_none(f);
  REQUIRE(stats.size() == 1);
  REQUIRE(stats[0].dropped == std::vector<int>{1});
  CHECK(stats[0].drop_reasons[0].find("worker_timeout") != std::string::npos);
  CHECK(stats[0].updates == 6);
}

TEST_CASE("ps: a server that is gone fails the workers with its rank, no hang", "[ps]") {
  std::mutex m;
  std::vector<std::string> messages;
  const auto f = run_collecting(3, [&](communicator& c, failures& fail) {
    const auto init = initial_params(20);
    ps::node n(c, init, {.mode = ps::consistency::async, .servers = 1});
    if (n.is_server()) return;  // ends without serving
    std::vector<float> p = init;
    try {
      n.pull(p).wait();
      fail.push_back(fmt::format("rank {}: pull from a gone server returned", c.rank()));
    } catch (const ps::server_error& e) {
      if (e.server_rank() != 0) fail.push_back("wrong server rank");
      std::lock_guard lock(m);
      messages.push_back(e.what());
    }
  });
  require_none(f);
  REQUIRE(messages.size() == 2);
  for (const auto& s : messages) CHECK_THAT(s, Catch::Contains("parameter server rank 0"));
}

TEST_CASE("ps local SGD: H local steps, then the workers' average", "[ps]") {
  const int H = 4, steps = 8;
  const std::size_t numel = 40;
  std::vector<float> got;
  std::mutex m;
  const auto f = run_collecting(3, [&](communicator& c, failures& fail) {
    const auto init = initial_params(numel);
    ps::node n(c, init, {.mode = ps::consistency::local_sgd, .servers = 1, .local_steps = H});
    std::vector<float> p = init;
    if (n.is_worker()) {
      ad::parameter_store<float> store;
      store.add("p", ad::shape{static_cast<ad::index>(numel)});
      std::copy(init.begin(), init.end(), store.all_values().begin());
      ad::sgd opt(store, {.lr = 0.1});
      int averaged = 0;
      for (int t = 0; t < steps; ++t) {
        gradient(store.all_values(), n.worker_index(), t, store.all_grads());
        opt.step();
        averaged += n.average(store.all_values(), t) ? 1 : 0;
      }
      if (averaged != steps / H) fail.push_back("wrong number of averages");
      std::copy(store.all_values().begin(), store.all_values().end(), p.begin());
      n.finish();
    } else {
      n.serve();
    }
    n.gather_parameters(p);
    if (c.rank() == 0) {
      std::lock_guard lock(m);
      got = p;
    }
  });
  require_none(f);
  // Serial reference: two workers, sgd without momentum, average every H.
  std::vector<std::vector<float>> w(2, initial_params(numel));
  std::vector<float> g(numel);
  for (int t = 0; t < steps; ++t) {
    for (int k = 0; k < 2; ++k) {
      gradient(w[static_cast<std::size_t>(k)], k, t, g);
      for (std::size_t i = 0; i < numel; ++i) w[static_cast<std::size_t>(k)][i] -= 0.1f * g[i];
    }
    if ((t + 1) % H == 0) {
      for (std::size_t i = 0; i < numel; ++i) w[0][i] = w[1][i] = (w[0][i] + w[1][i]) / 2;
    }
  }
  REQUIRE(got.size() == numel);
  for (std::size_t i = 0; i < numel; ++i) CHECK(std::abs(got[i] - w[0][i]) <= 1e-6);
}

namespace {

fs::path fresh_dir(const std::string& tag) {
  auto d = fs::temp_directory_path() / ("ringflow_ps_" + tag + "_" + std::to_string(::getpid()));
  fs::remove_all(d);
  fs::create_directories(d);
  return d;
}

struct span {
  std::string name;
  int tid = -1;
  nlohmann::json args;
};

// The complete events of a trace file, with their args (read_trace keeps
// only step, bucket and bytes; the ps spans carry more).
std::vector<span> read_spans(const fs::path& file) {
  std::ifstream f(file);
  const auto doc = nlohmann::json::parse(f);
  std::vector<span> out;
  for (const auto& e : doc.at("traceEvents")) {
    if (e.at("ph") != "X") continue;
    out.push_back({e.at("name").get<std::string>(), e.at("tid").get<int>(), e.at("args")});
  }
  return out;
}

std::vector<span> named(const std::vector<span>& all, const std::string& name) {
  std::vector<span> out;
  for (const auto& s : all) {
    if (s.name == name) out.push_back(s);
  }
  return out;
}

}  // namespace

TEST_CASE("ps timeline: a span per push, pull, apply and serve, and each server's load",
          "[ps][timeline]") {
  const scoped_env no_env("RINGFLOW_TIMELINE", nullptr);
  const int steps = 4;
  const std::size_t numel = 101;
  constexpr std::uint64_t header = 24;
  struct setup {
    int ranks;
    ps::consistency mode;
    ps::placement where;
    int servers;
  };
  for (const setup s : {setup{4, ps::consistency::sync, ps::placement::dedicated, 2},
                        setup{4, ps::consistency::async, ps::placement::dedicated, 2},
                        setup{3, ps::consistency::ssp, ps::placement::colocated, 0}}) {
    INFO("mode " << ps::to_string(s.mode) << " ranks " << s.ranks << " servers " << s.servers);
    const fs::path dir = fresh_dir("trace");
    ps::options o{.mode = s.mode, .where = s.where, .servers = s.servers, .staleness = 1};
    o.optimizer.sgd = {.lr = 0.05, .momentum = 0.0};
    o.timeline_path = dir / "ps.json";
    const auto r =
        run_job(s.ranks, numel, o, [&](ps::node& n, std::vector<float>& p) { work(n, p, steps); });
    require_none(r.errors);
    const ps::layout l(numel, s.ranks, o);
    const int S = l.servers(), W = l.workers();
    REQUIRE(static_cast<int>(r.stats.size()) == S);
    for (int rank = 0; rank < s.ranks; ++rank) {
      INFO("rank " << rank);
      const fs::path file = dir / fmt::format("ps.rank{}.json", rank);
      REQUIRE(fs::exists(file));
      const auto all = read_spans(file);
      // The library's own strict reader takes it too (same format as train's).
      CHECK(train::read_trace(file).size() == all.size());
      if (l.worker_index(rank) >= 0) {
        const auto pushes = named(all, "push"), pulls = named(all, "pull");
        CHECK(pushes.size() == static_cast<std::size_t>(steps * S));
        CHECK(pulls.size() == static_cast<std::size_t>((steps + 1) * S));
        std::map<int, int> push_count, pull_count;
        for (const auto& e : pushes) {
          const int srv = e.args.at("server").get<int>();
          ++push_count[srv];
          CHECK(e.tid == 1 + srv);
          CHECK(e.args.at("bytes").get<std::uint64_t>() == header + l.shard(srv).size() * 4);
          CHECK(e.args.at("step").get<int>() >= 1);
        }
        for (const auto& e : pulls) {
          const int srv = e.args.at("server").get<int>();
          ++pull_count[srv];
          CHECK(e.args.at("bytes").get<std::uint64_t>() == l.shard(srv).size() * 4);
        }
        for (int srv = 0; srv < S; ++srv) {
          CHECK(push_count[srv] == steps);
          CHECK(pull_count[srv] == steps + 1);
        }
      } else {
        CHECK(named(all, "push").empty());
        CHECK(named(all, "pull").empty());
      }
      if (l.server_index(rank) >= 0) {
        const auto& st = r.stats[static_cast<std::size_t>(l.server_index(rank))];
        const auto applies = named(all, "apply"), serves = named(all, "serve");
        CHECK(applies.size() == st.updates);
        std::uint64_t gradients = 0;
        std::vector<std::uint64_t> hist(ps::staleness_buckets, 0);
        for (const auto& e : applies) {
          CHECK(e.tid == 0);
          const auto g = e.args.at("gradients").get<std::uint64_t>();
          gradients += g;
          const auto k = e.args.at("staleness").get<std::size_t>();
          hist[std::min(k, ps::staleness_buckets - 1)] += g;
          const int w = e.args.at("worker").get<int>();
          CHECK((s.mode == ps::consistency::sync ? w == -1 : (w >= 0 && w < W)));
        }
        CHECK(gradients == st.pushes);
        CHECK(hist == st.staleness);
        CHECK(st.pushes == static_cast<std::uint64_t>(steps * W));
        CHECK(serves.size() == st.pulls);
        CHECK(st.pulls == static_cast<std::uint64_t>((steps + 1) * W));
        if (s.mode == ps::consistency::sync) CHECK(st.updates == static_cast<std::uint64_t>(steps));
        // Headers of every push, pull and goodbye, and the gradient slices.
        const std::uint64_t n = l.shard(l.server_index(rank)).size();
        CHECK(st.bytes_received ==
              static_cast<std::uint64_t>(W) * ((2 * steps + 2) * header + steps * n * 4));
        CHECK(st.bytes_sent == st.pulls * n * 4);
        const auto load = named(all, "server load");
        REQUIRE(load.size() == 1);
        const auto& a = load[0].args;
        CHECK(a.at("updates").get<std::uint64_t>() == st.updates);
        CHECK(a.at("pushes").get<std::uint64_t>() == st.pushes);
        CHECK(a.at("pulls").get<std::uint64_t>() == st.pulls);
        CHECK(a.at("bytes_received").get<std::uint64_t>() == st.bytes_received);
        CHECK(a.at("bytes_sent").get<std::uint64_t>() == st.bytes_sent);
        CHECK(a.at("pushes_by_worker").get<std::vector<std::uint64_t>>() == st.pushes_by_worker);
        CHECK(a.at("staleness").get<std::vector<std::uint64_t>>() == st.staleness);
      } else {
        CHECK(named(all, "apply").empty());
        CHECK(named(all, "server load").empty());
      }
    }
    fs::remove_all(dir);
  }
}

TEST_CASE("ps timeline: off writes nothing; RINGFLOW_TIMELINE turns it on; bad paths throw",
          "[ps][timeline]") {
  const fs::path dir = fresh_dir("trace_off");
  const auto body = [](ps::node& n, std::vector<float>& p) { work(n, p, 2); };
  ps::options o{.mode = ps::consistency::async, .servers = 1};
  {
    const scoped_env no_env("RINGFLOW_TIMELINE", nullptr);
    std::atomic<int> with_file{0};
    const auto r = run_job(3, 40, o, [&](ps::node& n, std::vector<float>& p) {
      if (!n.timeline_file().empty()) ++with_file;
      n.write_timeline();  // a no-op when off
      body(n, p);
    });
    require_none(r.errors);
    CHECK(with_file == 0);
    CHECK(fs::is_empty(dir));
  }
  {
    const scoped_env env("RINGFLOW_TIMELINE", (dir / "env.json").c_str());
    const auto r = run_job(3, 40, o, body);
    require_none(r.errors);
    for (int rank = 0; rank < 3; ++rank) {
      const auto spans = read_spans(dir / fmt::format("env.rank{}.json", rank));
      CHECK(named(spans, rank == 0 ? "apply" : "push").size() == (rank == 0 ? 4u : 2u));
    }
  }
  {
    const scoped_env no_env("RINGFLOW_TIMELINE", nullptr);
    o.timeline_path = dir / "missing" / "folder" / "ps.json";
    std::mutex m;
    std::vector<std::string> messages;
    const auto r = run_job(3, 40, o, [&](ps::node& n, std::vector<float>& p) {
      body(n, p);
      try {
        n.write_timeline();
      } catch (const ringflow::error& e) {
        std::lock_guard lock(m);
        messages.push_back(e.what());
      }
    });
    require_none(r.errors);  // the servers' destructors log the failure, never throw
    REQUIRE(messages.size() == 2);
    for (const auto& msg : messages) {
      CHECK_THAT(msg, Catch::Contains("ps::node on rank") && Catch::Contains("ps.rank") &&
                          Catch::Contains("writable"));
    }
  }
  fs::remove_all(dir);
}

namespace {

// A buffer of a dense head, one table of 50 rows x 4 and a dense tail.
constexpr std::size_t head = 37, table_rows_n = 50, width = 4, tail = 13;
constexpr std::size_t table_numel = head + table_rows_n * width + tail;
const ps::table_range the_table{.offset = head, .rows = table_rows_n, .width = width};

bool in_table(std::size_t i) { return i >= head && i < head + table_rows_n * width; }

// The rows worker w looks up at step t (a repeat included).
std::vector<std::int64_t> rows_of(int w, int t) {
  std::vector<std::int64_t> r;
  for (int j = 0; j < 6; ++j) r.push_back((7 * w + 3 * t + j * j) % 50);
  r.push_back(r.front());
  return r;
}

// The gradient of a step: dense elements from p, one row per looked-up id
// (a function of that row's values).
void table_gradient(std::span<const float> p, int w, int t, std::span<float> dense,
                    const std::vector<std::int64_t>& rows, std::vector<float>& row_values) {
  for (std::size_t i = 0; i < p.size(); ++i) {
    dense[i] = in_table(i) ? 0.0f
                           : 0.3f * p[i] - 0.1f * std::cos(0.01f * static_cast<float>(i * (w + 1)) +
                                                           0.2f * static_cast<float>(t));
  }
  row_values.clear();
  for (std::size_t k = 0; k < rows.size(); ++k) {
    for (std::size_t j = 0; j < width; ++j) {
      const float v = p[head + static_cast<std::size_t>(rows[k]) * width + j];
      row_values.push_back(0.2f * v + 0.05f * std::sin(static_cast<float>(w + t) +
                                                       0.3f * static_cast<float>(k + j)));
    }
  }
}

// sparse: pull_sparse / push_sparse of the looked-up rows; otherwise pull
// and push the whole buffer, the rows scatter-added into a zero table.
void table_work(ps::node& n, std::vector<float>& params, int steps, bool sparse) {
  std::vector<float> g(params.size());
  std::vector<float> row_values;
  const int w = n.worker_index();
  for (int t = 0; t < steps; ++t) {
    const auto rows = rows_of(w, t);
    if (sparse) {
      const std::span<const std::int64_t> want(rows);
      n.pull_sparse(params, std::span(&want, 1)).wait();
    } else {
      n.pull(params).wait();
    }
    table_gradient(params, w, t, g, rows, row_values);
    if (sparse) {
      const ps::table_rows tr{rows, row_values};
      n.push_sparse(g, std::span(&tr, 1)).wait();
    } else {
      for (std::size_t k = 0; k < rows.size(); ++k) {
        for (std::size_t j = 0; j < width; ++j) {
          g[head + static_cast<std::size_t>(rows[k]) * width + j] += row_values[k * width + j];
        }
      }
      n.push(g).wait();
    }
  }
  n.finish();
}

}  // namespace

TEST_CASE("ps sparse rows: a sync sparse push equals the dense push with zero rows (bitwise)",
          "[ps][sparse]") {
  const scoped_env no_env("RINGFLOW_TIMELINE", nullptr);
  const int steps = 6;
  struct setup {
    int ranks;
    ps::placement where;
    int servers;
  };
  // 3 servers: the balanced cuts (84, 167) fall inside table rows and move
  // back to row starts (81, 165).
  for (const setup s :
       {setup{5, ps::placement::dedicated, 2}, setup{4, ps::placement::dedicated, 3},
        setup{3, ps::placement::colocated, 0}}) {
    INFO("ranks " << s.ranks << " servers " << s.servers);
    ps::options o{.mode = ps::consistency::sync, .where = s.where, .servers = s.servers};
    o.optimizer.sgd = {.lr = 0.1, .momentum = 0.0};
    std::atomic<std::uint64_t> dense_bytes{0}, sparse_bytes{0};
    const auto dense = run_job(s.ranks, table_numel, o, [&](ps::node& n, std::vector<float>& p) {
      table_work(n, p, steps, false);
      dense_bytes += n.bytes_sent();
    });
    require_none(dense.errors);
    ps::options ot = o;
    ot.tables = {the_table};
    const auto sparse = run_job(s.ranks, table_numel, ot, [&](ps::node& n, std::vector<float>& p) {
      table_work(n, p, steps, true);
      sparse_bytes += n.bytes_sent();
    });
    require_none(sparse.errors);
    // A dense push to a job with tables names every row: the same again.
    const auto mixed = run_job(s.ranks, table_numel, ot, [&](ps::node& n, std::vector<float>& p) {
      table_work(n, p, steps, false);
    });
    require_none(mixed.errors);
    REQUIRE(dense.params.size() == table_numel);
    REQUIRE(sparse.params.size() == table_numel);
    REQUIRE(mixed.params.size() == table_numel);
    CHECK(std::memcmp(dense.params.data(), sparse.params.data(), table_numel * 4) == 0);
    CHECK(std::memcmp(dense.params.data(), mixed.params.data(), table_numel * 4) == 0);
    CHECK(dense.params != initial_params(table_numel));
    CHECK(sparse_bytes < dense_bytes / 2);
    if (s.servers == 3) {
      const ps::layout l(table_numel, s.ranks, ot);
      CHECK(l.shard(0).end == 81);
      CHECK(l.shard(1).end == 165);
      CHECK(l.server_of(80) == 0);
      CHECK(l.server_of(81) == 1);
    }
  }
}

TEST_CASE("ps sparse rows: AdamW moves only the rows named (lazy, as ad::adamw's tables)",
          "[ps][sparse]") {
  const int steps = 4, W = 2;
  ps::options o{.mode = ps::consistency::sync, .servers = 1};
  o.optimizer.type = ps::optimizer_options::kind::adamw;
  o.optimizer.adamw = {.lr = 0.01, .weight_decay = 0.1};
  o.tables = {the_table};
  const auto r = run_job(1 + W, table_numel, o, [&](ps::node& n, std::vector<float>& p) {
    table_work(n, p, steps, true);
  });
  require_none(r.errors);

  // The reference: ad::adamw over the same store layout, a sparse table in
  // the middle, fed the workers' averaged gradients.
  ad::parameter_store<float> store;
  store.add("head", ad::shape{static_cast<ad::index>(head)});
  auto t = store.add(
      "table", ad::shape{static_cast<ad::index>(table_rows_n), static_cast<ad::index>(width)});
  store.add("tail", ad::shape{static_cast<ad::index>(tail)});
  auto sg = std::make_shared<ad::sparse_rows_grad<float>>();
  sg->width = width;
  sg->rows = static_cast<std::int64_t>(table_rows_n);
  t.node()->sparse = sg;
  const auto init = initial_params(table_numel);
  std::copy(init.begin(), init.end(), store.all_values().begin());
  ad::adamw opt(store, o.optimizer.adamw);
  std::vector<bool> touched(table_rows_n, false);
  for (int step = 0; step < steps; ++step) {
    std::vector<float> total(table_numel, 0.0f), g(table_numel), rv;
    const std::vector<float> p(store.all_values().begin(), store.all_values().end());
    sg->clear();
    for (int w = 0; w < W; ++w) {
      const auto rows = rows_of(w, step);
      table_gradient(p, w, step, g, rows, rv);
      for (std::size_t i = 0; i < table_numel; ++i) total[i] += g[i];
      for (std::size_t k = 0; k < rows.size(); ++k) {
        sg->add_row(rows[k], rv.data() + k * width);
        touched[static_cast<std::size_t>(rows[k])] = true;
      }
    }
    sg->coalesce();
    for (auto& x : sg->values) x /= static_cast<float>(W);
    for (auto& x : total) x /= static_cast<float>(W);
    std::copy(total.begin(), total.end(), store.all_grads().begin());
    opt.step();
  }
  const auto ref = store.all_values();
  REQUIRE(r.params.size() == table_numel);
  CHECK(std::memcmp(r.params.data(), ref.data(), table_numel * 4) == 0);
  int untouched = 0;
  for (std::size_t row = 0; row < table_rows_n; ++row) {
    if (touched[row]) continue;
    ++untouched;
    for (std::size_t j = 0; j < width; ++j) {
      const std::size_t i = head + row * width + j;
      CHECK(r.params[i] == init[i]);  // dense AdamW would decay these
    }
  }
  CHECK(untouched > 0);
}

TEST_CASE("ps sparse rows: rows outside the table and bad tables are refused, naming the rank",
          "[ps][sparse]") {
  ps::options o{.mode = ps::consistency::sync, .servers = 1};
  o.tables = {the_table};
  std::mutex m;
  std::vector<std::string> messages;
  const auto r = run_job(3, table_numel, o, [&](ps::node& n, std::vector<float>& p) {
    const auto note = [&](auto&& f) {
      try {
        f();
      } catch (const usage_error& e) {
        std::lock_guard lock(m);
        messages.push_back(e.what());
      }
    };
    if (n.worker_index() == 0) {
      std::vector<float> g(p.size(), 0.0f), v(2 * width, 0.0f);
      const std::vector<std::int64_t> bad = {3, 50};
      const ps::table_rows tr{bad, v};
      note([&] { n.push_sparse(g, std::span(&tr, 1)).wait(); });
      const std::vector<std::int64_t> neg = {-1};
      const std::span<const std::int64_t> want(neg);
      note([&] { n.pull_sparse(p, std::span(&want, 1)).wait(); });
      const ps::table_rows short_values{std::span<const std::int64_t>(bad).first(1),
                                        std::span<const float>(v).first(3)};
      note([&] { n.push_sparse(g, std::span(&short_values, 1)).wait(); });
      note([&] { n.push_sparse(g, {}).wait(); });
    }
    table_work(n, p, 2, true);
  });
  require_none(r.errors);
  REQUIRE(messages.size() == 4);
  CHECK_THAT(messages[0], Catch::Contains("rank 1") && Catch::Contains("push_sparse") &&
                              Catch::Contains("row 50 of table 0 is outside [0, 50)"));
  CHECK_THAT(messages[1], Catch::Contains("rank 1") && Catch::Contains("pull_sparse") &&
                              Catch::Contains("row -1"));
  CHECK_THAT(messages[2], Catch::Contains("rank 1") && Catch::Contains("3 values"));
  CHECK_THAT(messages[3], Catch::Contains("rank 1") && Catch::Contains("rows for 0 table(s)"));

  ps::options bad = o;
  bad.tables = {{.offset = 240, .rows = 5, .width = 4}};
  CHECK_THROWS_WITH(ps::layout(table_numel, 3, bad, 2),
                    Catch::Contains("rank 2") && Catch::Contains("table 0"));
  bad.tables = {{.offset = 0, .rows = 1, .width = 10}};
  bad.servers = 2;
  CHECK_THROWS_WITH(ps::layout(10, 4, bad, 1),
                    Catch::Contains("rank 1") && Catch::Contains("wider than a shard"));
  ps::options none{.servers = 1};
  const auto r2 = run_job(2, 40, none, [&](ps::node& n, std::vector<float>& p) {
    std::vector<float> g(p.size(), 0.0f);
    try {
      n.push_sparse(g, {}).wait();
    } catch (const usage_error& e) {
      std::lock_guard lock(m);
      messages.push_back(e.what());
    }
    work(n, p, 1);
  });
  require_none(r2.errors);
  REQUIRE(messages.size() == 5);
  CHECK_THAT(messages[4], Catch::Contains("no sparse tables"));
}
