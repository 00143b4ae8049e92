// Uneven inputs (join): a rank with fewer batches takes part with zeros until every rank is
// done; each step averages over the ranks that contributed. data_parallel and sharded stages.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "ringflow/ad/autodiff.hpp"
#include "ringflow/backends/local.hpp"
#include "ringflow/train/data_parallel.hpp"
#include "ringflow/train/sharded_data_parallel.hpp"
#include "support/catch.hpp"
#include "support/noise.hpp"

using namespace ringflow;

namespace {

using ringflow::testing::noise;

const std::vector<ad::index> model_sizes = {10, 24, 17, 4};
constexpr std::size_t features = 10;
constexpr std::size_t local_batch = 6;
constexpr int full_batches = 20;
constexpr int short_batches = 18;  // 10% fewer

// Rank r's batch of step t.
ad::tensor loss_of(ad::mlp& model, int rank, int t) {
  const std::uint64_t seed = 100u * static_cast<unsigned>(t) + static_cast<unsigned>(rank);
  const auto x = noise(local_batch * features, seed);
  std::vector<int> y;
  for (std::size_t i = 0; i < local_batch; ++i) y.push_back(static_cast<int>((i * 7 + seed) % 4));
  const ad::matrix<float> m = Eigen::Map<const ad::matrix<float>>(
      x.data(), static_cast<ad::index>(local_batch), static_cast<ad::index>(features));
  return ad::softmax_cross_entropy(model(ad::tensor::from_matrix(m)), std::span<const int>(y));
}

double lr_at(std::int64_t t) { return 1e-2 / (1 + 0.1 * static_cast<double>(t)); }

int batches_of(int rank, int p) { return p > 1 && rank == p - 1 ? short_batches : full_batches; }

std::vector<float> copy_of(std::span<const float> s) { return {s.begin(), s.end()}; }

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

struct run_result {
  std::vector<std::vector<float>> before;    // parameters before each step
  std::vector<std::vector<float>> averaged;  // the averaged gradient of each step (stage 0)
  std::vector<std::vector<float>> after;     // parameters after each step
  std::vector<int> contributing;             // last_step().contributing_ranks
  std::int64_t shadowed = -1;
  std::int64_t steps = 0;
};

// Trains batches_of(rank) steps, then joins. Stage 0: data_parallel over the
// ring; 1, 2: sharded. `uneven` off: every rank trains `even_steps` batches.
run_result train_run(communicator& c, int stage, bool uneven, int even_steps = 0) {
  ad::mlp model(model_sizes, ad::activation::tanh, 3 + static_cast<unsigned>(c.rank()));
  run_result out;
  const int mine = uneven ? batches_of(c.rank(), c.size()) : even_steps;
  const auto record_after = [&](const auto& trainer) {
    out.after.push_back(copy_of(model.parameters().all_values()));
    out.contributing.push_back(trainer.last_step().contributing_ranks);
  };
  // In join()'s callback the step's reduction is done but its optimizer step
  // not yet: its count now, its parameters at the next callback (or after).
  const auto record_count = [&](const auto& trainer) {
    out.contributing.push_back(trainer.last_step().contributing_ranks);
  };
  const auto record_params = [&] { out.after.push_back(copy_of(model.parameters().all_values())); };
  if (stage == 0) {
    train::data_parallel dp(c, model.parameters(),
                            {.bucket_cap_bytes = 512,
                             .first_bucket_cap_bytes = 256,
                             .coll = {algo::ring, 0},
                             .uneven_inputs = uneven});
    ad::adamw opt(model.parameters(), {.lr = 1e-2, .weight_decay = 0.05});
    for (int t = 0; t < mine; ++t) {
      out.before.push_back(copy_of(model.parameters().all_values()));
      opt.set_lr(lr_at(t));
      opt.zero_grad();
      dp.backward(loss_of(model, c.rank(), t));
      dp.finish();
      out.averaged.push_back(copy_of(model.parameters().all_grads()));
      opt.step();
      record_after(dp);
    }
    if (uneven) {
      // The callback runs between the shadowed step's reduction and opt.step().
      std::int64_t pending = -1;
      out.shadowed = dp.join(opt, [&](std::int64_t t) {
        if (pending >= 0) record_params();
        record_count(dp);
        out.before.push_back(copy_of(model.parameters().all_values()));
        out.averaged.push_back(copy_of(model.parameters().all_grads()));
        opt.set_lr(lr_at(t));
        pending = t;
      });
      if (pending >= 0) record_params();
    }
    out.steps = dp.steps();
  } else {
    train::sharded_data_parallel sdp(c, model.parameters(),
                                     {.stage = stage,
                                      .bucket_cap_bytes = 512,
                                      .first_bucket_cap_bytes = 256,
                                      .uneven_inputs = uneven});
    ad::adamw opt(sdp.shard(), {.lr = 1e-2, .weight_decay = 0.05});
    for (int t = 0; t < mine; ++t) {
      opt.set_lr(lr_at(t));
      opt.zero_grad();
      sdp.backward(loss_of(model, c.rank(), t));
      sdp.step(opt);
      record_after(sdp);
    }
    if (uneven) {
      std::int64_t pending = -1;
      out.shadowed = sdp.join(opt, [&](std::int64_t t) {
        if (pending >= 0) record_params();
        record_count(sdp);
        opt.set_lr(lr_at(t));
        pending = t;
      });
      if (pending >= 0) record_params();
    }
    out.steps = sdp.steps();
  }
  return out;
}

template <class Body>
std::vector<run_result> per_rank(int p, Body body) {
  std::vector<run_result> out(static_cast<std::size_t>(p));
  local::run(p, [&](communicator& c) { out[static_cast<std::size_t>(c.rank())] = body(c); });
  return out;
}

}  // namespace

TEST_CASE("join: one rank 10% short ends without a timeout, averaging over the contributors",
          "[train][join]") {
  for (int p : {2, 3, 4}) {
    INFO("ranks " << p);
    const auto plain = per_rank(p, [](communicator& c) { return train_run(c, 0, true); });
    for (int r = 0; r < p; ++r) {
      const auto& m = plain[static_cast<std::size_t>(r)];
      INFO("rank " << r);
      // Every rank took all 20 steps; the short one shadowed the last 2.
      REQUIRE(m.steps == full_batches);
      REQUIRE(m.after.size() == static_cast<std::size_t>(full_batches));
      REQUIRE(m.shadowed == (r == p - 1 ? full_batches - short_batches : 0));
      for (int t = 0; t < full_batches; ++t) {
        INFO("step " << t);
        const auto ts = static_cast<std::size_t>(t);
        REQUIRE(m.contributing[ts] == (t < short_batches ? p : p - 1));
        // Parameters and gradients bitwise identical on every rank, joined or not.
        REQUIRE(same_bits(m.after[ts], plain[0].after[ts]));
        REQUIRE(same_bits(m.averaged[ts], plain[0].averaged[ts]));
      }
    }
    // The average of each step, by hand: the contributing ranks' own gradients
    // at the step's parameters, summed in double and divided by their count.
    double worst = 0;
    for (int t = 0; t < full_batches; ++t) {
      const auto ts = static_cast<std::size_t>(t);
      ad::mlp ref(model_sizes, ad::activation::tanh, 1);
      std::vector<double> want(ref.parameters().numel(), 0.0);
      int count = 0;
      for (int r = 0; r < p; ++r) {
        if (t >= batches_of(r, p)) continue;
        ++count;
        const auto& v = plain[0].before[ts];
        std::copy(v.begin(), v.end(), ref.parameters().all_values().begin());
        ref.zero_grad();
        loss_of(ref, r, t).backward();
        const auto g = ref.parameters().all_grads();
        for (std::size_t i = 0; i < want.size(); ++i) want[i] += g[i];
      }
      REQUIRE(count == (t < short_batches ? p : p - 1));
      double d = 0, n = 0;
      const auto& got = plain[0].averaged[ts];
      for (std::size_t i = 0; i < want.size(); ++i) {
        want[i] /= count;
        d += (got[i] - want[i]) * (got[i] - want[i]);
        n += want[i] * want[i];
      }
      INFO("step " << t << " relative error " << std::sqrt(d / n));
      REQUIRE(n > 0);
      // Dividing by p instead of p - 1 would be off by 1/p (>= 25%).
      REQUIRE(std::sqrt(d / n) <= 1e-6);
      worst = std::max(worst, std::sqrt(d / n));
    }
    // While every rank contributes, uneven_inputs changes nothing: bitwise the
    // run without it.
    const auto even =
        per_rank(p, [](communicator& c) { return train_run(c, 0, false, short_batches); });
    for (int t = 0; t < short_batches; ++t) {
      REQUIRE(same_bits(even[0].after[static_cast<std::size_t>(t)],
                        plain[0].after[static_cast<std::size_t>(t)]));
    }
    // Sharded stages join alike, bitwise equal to data_parallel over the ring.
    for (int stage : {1, 2}) {
      INFO("stage " << stage);
      const auto sharded =
          per_rank(p, [stage](communicator& c) { return train_run(c, stage, true); });
      for (int r = 0; r < p; ++r) {
        const auto& m = sharded[static_cast<std::size_t>(r)];
        REQUIRE(m.steps == full_batches);
        REQUIRE(m.shadowed == (r == p - 1 ? full_batches - short_batches : 0));
        REQUIRE(m.after.size() == static_cast<std::size_t>(full_batches));
        for (int t = 0; t < full_batches; ++t) {
          INFO("rank " << r << " step " << t);
          REQUIRE(m.contributing[static_cast<std::size_t>(t)] == (t < short_batches ? p : p - 1));
          REQUIRE(same_bits(m.after[static_cast<std::size_t>(t)],
                            plain[0].after[static_cast<std::size_t>(t)]));
        }
      }
    }
  }
}

TEST_CASE("join: several ranks short by different amounts, then another epoch", "[train][join]") {
  // Ranks stop after 5, 3, 7 and 7 batches; then all train 2 more steps together.
  const int p = 4;
  const std::vector<int> counts = {5, 3, 7, 7};
  struct result {
    std::vector<int> contributing;
    std::vector<std::vector<float>> after;
    std::int64_t shadowed = 0;
  };
  std::vector<result> res(p);
  local::run(p, [&](communicator& c) {
    auto& out = res[static_cast<std::size_t>(c.rank())];
    ad::mlp model(model_sizes, ad::activation::tanh, 3);
    train::data_parallel dp(c, model.parameters(), {.uneven_inputs = true});
    ad::sgd opt(model.parameters(), {.lr = 1e-2, .momentum = 0.9});
    const auto note = [&] {
      out.contributing.push_back(dp.last_step().contributing_ranks);
      out.after.push_back(copy_of(model.parameters().all_values()));
    };
    const auto note_params = [&] { out.after.push_back(copy_of(model.parameters().all_values())); };
    int t = 0;
    for (; t < counts[static_cast<std::size_t>(c.rank())]; ++t) {
      opt.zero_grad();
      dp.backward(loss_of(model, c.rank(), t));
      dp.step(opt);
      note();
    }
    bool first = true;
    out.shadowed = dp.join(opt, [&](std::int64_t) {
      if (!first) note_params();
      out.contributing.push_back(dp.last_step().contributing_ranks);
      first = false;
    });
    if (!first) note_params();
    for (int e = 0; e < 2; ++e) {  // the next epoch: everyone again
      opt.zero_grad();
      dp.backward(loss_of(model, c.rank(), 100 + e));
      dp.step(opt);
      note();
    }
  });
  const std::vector<int> want = {4, 4, 4, 3, 3, 2, 2, 4, 4};
  for (int r = 0; r < p; ++r) {
    const auto& m = res[static_cast<std::size_t>(r)];
    INFO("rank " << r);
    REQUIRE(m.shadowed == 7 - counts[static_cast<std::size_t>(r)]);
    REQUIRE(m.contributing == want);
    for (std::size_t t = 0; t < want.size(); ++t) REQUIRE(same_bits(m.after[t], res[0].after[t]));
  }
}

TEST_CASE("join: usage errors name the problem and the rank", "[train][join][errors]") {
  std::vector<std::vector<std::string>> errs(2);
  local::run(2, [&](communicator& c) {
    auto& out = errs[static_cast<std::size_t>(c.rank())];
    const auto expect = [&](auto&& f) {
      try {
        f();
        out.push_back("(no error)");
      } catch (const error& e) {
        out.push_back(e.what());
      }
    };
    ad::mlp model(model_sizes, ad::activation::tanh, 3);
    {
      train::data_parallel dp(c, model.parameters());
      ad::adamw opt(model.parameters());
      expect([&] { dp.join(opt); });  // uneven_inputs off
    }
    expect([&] {
      train::data_parallel dp(c, model.parameters(), {.compress = "int8", .uneven_inputs = true});
    });
    {
      train::data_parallel dp(c, model.parameters(), {.uneven_inputs = true});
      ad::adamw opt(model.parameters());
      opt.zero_grad();
      dp.backward(loss_of(model, c.rank(), 0));
      expect([&] { dp.join(opt); });  // a backward not finished
      dp.step(opt);
      {
        auto ns = dp.no_sync();
        expect([&] { dp.join(opt); });
      }
      expect([&] { dp.join(opt); });  // both ranks join: fine, returns at once
    }
    {
      train::sharded_data_parallel sdp(c, model.parameters(), {.stage = 2});
      ad::adamw opt(sdp.shard());
      expect([&] { sdp.join(opt); });
    }
  });
  const std::vector<std::string> want = {"uneven_inputs", "compression 'int8'", "middle of step",
                                         "no_sync",       "(no error)",         "uneven_inputs"};
  for (int r = 0; r < 2; ++r) {
    const auto& e = errs[static_cast<std::size_t>(r)];
    REQUIRE(e.size() == want.size());
    for (std::size_t i = 0; i < e.size(); ++i) {
      INFO(e[i]);
      REQUIRE(e[i].find(want[i]) != std::string::npos);
      if (want[i] != "(no error)")
        REQUIRE(e[i].find("rank " + std::to_string(r)) != std::string::npos);
    }
  }
}
