// data_parallel, sharded_data_parallel (ZeRO 1/2) and collective checkpoints over MPI (mpirun
// -np 1..5): averaging, identical parameters, unused parameters, resume, join.
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "ringflow/ad/autodiff.hpp"
#include "ringflow/backends/mpi.hpp"
#include "ringflow/coll/collectives.hpp"
#include "ringflow/train/checkpoint.hpp"
#include "ringflow/train/data_parallel.hpp"
#include "ringflow/train/sharded_data_parallel.hpp"
#include "support/catch.hpp"

using namespace ringflow;
namespace fs = std::filesystem;

namespace {

std::vector<float> inputs(std::size_t n, unsigned seed) {
  std::vector<float> v(n);
  for (std::size_t i = 0; i < n; ++i) {
    v[i] = static_cast<float>((i * 2654435761u + seed * 40503u) % 1000) / 500.0f - 1.0f;
  }
  return v;
}

// Every rank's copy of `v` equals rank 0's, bit for bit (agreed on all ranks).
bool same_on_all_ranks(const communicator& comm, std::vector<float> v) {
  std::vector<float> root = v;
  broadcast(comm, std::span<float>(root), 0);
  int same = std::memcmp(root.data(), v.data(), v.size() * sizeof(float)) == 0 ? 1 : 0;
  allreduce(comm, std::span<int>(&same, 1), min);
  return same == 1;
}

std::vector<float> copy_of_values(ad::mlp& model) {
  const auto v = model.parameters().all_values();
  return {v.begin(), v.end()};
}

// One step on this rank's 4 samples of a global batch of 4 * size.
float train_step(ad::mlp& model, ad::adamw& opt, train::data_parallel& dp, int rank, int step) {
  const auto x = inputs(4 * 8, static_cast<unsigned>(100 * step + rank));
  const std::vector<int> y = {0, 1, 2, (rank + step) % 3};
  opt.zero_grad();
  auto loss = ad::softmax_cross_entropy(model(ad::tensor::from_data(x.data(), {4, 8})),
                                        std::span<const int>(y));
  dp.backward(loss);
  dp.step(opt);
  return loss.item();
}

}  // namespace

TEST_CASE("mpi: data_parallel averages gradients and keeps parameters bitwise identical",
          "[mpi][train]") {
  auto world = mpi::world();
  ad::mlp model({8, 16, 3}, ad::activation::relu, 10 + static_cast<unsigned>(world.rank()));
  train::data_parallel dp(world, model.parameters(),
                          {.bucket_cap_bytes = 256, .first_bucket_cap_bytes = 64});
  ad::adamw opt(model.parameters(), {.lr = 1e-2});
  auto v = model.parameters().all_values();
  REQUIRE(same_on_all_ranks(world, {v.begin(), v.end()}));  // broadcast from rank 0

  // The averaged gradient equals the mean of the ranks' own gradients.
  const auto x = inputs(4 * 8, static_cast<unsigned>(world.rank()));
  const std::vector<int> y = {0, 1, 2, 1};
  model.zero_grad();
  dp.backward(ad::softmax_cross_entropy(model(ad::tensor::from_data(x.data(), {4, 8})),
                                        std::span<const int>(y)));
  auto g = model.parameters().all_grads();
  // This rank's own gradient, from a copy of the model (the buckets launched
  // during backward may already have averaged parts of g).
  std::vector<double> own;
  {
    ad::mlp copy({8, 16, 3}, ad::activation::relu, 10);
    auto cv = copy.parameters().all_values();
    std::copy(v.begin(), v.end(), cv.begin());
    copy.zero_grad();
    ad::softmax_cross_entropy(copy(ad::tensor::from_data(x.data(), {4, 8})),
                              std::span<const int>(y))
        .backward();
    auto cg = copy.parameters().all_grads();
    own.assign(cg.begin(), cg.end());
  }
  dp.finish();
  allreduce(world, std::span<double>(own), sum);
  for (std::size_t i = 0; i < own.size(); ++i) {
    REQUIRE(std::abs(g[i] - own[i] / world.size()) < 1e-5);
  }
  REQUIRE(same_on_all_ranks(world, {g.begin(), g.end()}));

  for (int step = 0; step < 4; ++step) {
    train_step(model, opt, dp, world.rank(), step);
    for (auto n : dp.ready_counts()) REQUIRE(n == 1);
    v = model.parameters().all_values();
    REQUIRE(same_on_all_ranks(world, {v.begin(), v.end()}));
  }
}

TEST_CASE("mpi: a parameter unused on some ranks does not hang", "[mpi][train]") {
  auto world = mpi::world();
  ad::parameter_store<float> store;
  auto a = store.add("a", {4, 2});
  auto b = store.add("b", {4, 2});
  for (auto& v : store.all_values()) v = 0.5f;
  train::data_parallel dp(world, store, {.bucket_cap_bytes = 0, .first_bucket_cap_bytes = 0});
  for (int step = 0; step < 3; ++step) {
    store.zero_grad();
    const auto x = inputs(8, static_cast<unsigned>(world.rank()));
    auto xt = ad::tensor::from_data(x.data(), {2, 4});
    auto y = ad::matmul(xt, a);
    if ((world.rank() + step) % 2 == 1) y = y + ad::matmul(xt, b);  // b: odd ranks, then even
    dp.backward(ad::sum(y));
    dp.finish();
    auto g = store.all_grads();
    REQUIRE(same_on_all_ranks(world, {g.begin(), g.end()}));
  }
}

TEST_CASE("mpi: collective checkpoint save and load resume the same losses", "[mpi][train]") {
  auto world = mpi::world();
  // Rank 0 picks a fresh folder; the others learn its name.
  std::string dir;
  if (world.rank() == 0) {
    dir =
        (fs::temp_directory_path() / ("ringflow_mpi_ckpt_" + std::to_string(::getpid()))).string();
    fs::create_directories(dir);
  }
  std::int64_t len = static_cast<std::int64_t>(dir.size());
  broadcast(world, std::span<std::int64_t>(&len, 1), 0);
  std::vector<std::uint8_t> name(dir.begin(), dir.end());
  name.resize(static_cast<std::size_t>(len));
  broadcast(world, std::span<std::uint8_t>(name), 0);
  const fs::path file = fs::path(std::string(name.begin(), name.end())) / "ck.rfck";

  std::vector<float> first, second;
  {
    ad::mlp model({8, 16, 3}, ad::activation::relu, 3);
    ad::adamw opt(model.parameters(), {.lr = 1e-2});
    train::data_parallel dp(world, model.parameters());
    train::training_state st{.params = model.parameters(),
                             .optimizer = train::optimizer_state_of(opt),
                             .world_size = world.size()};
    for (int s = 0; s < 3; ++s) train_step(model, opt, dp, world.rank(), s);
    st.step = 3;
    train::save_checkpoint(world, file, st);
    for (int s = 3; s < 6; ++s) first.push_back(train_step(model, opt, dp, world.rank(), s));
  }
  {
    ad::mlp model({8, 16, 3}, ad::activation::relu, 77);
    ad::adamw opt(model.parameters(), {.lr = 1e-2});
    train::training_state st{.params = model.parameters(),
                             .optimizer = train::optimizer_state_of(opt)};
    train::load_checkpoint(world, file, st);
    REQUIRE(st.step == 3);
    train::data_parallel dp(world, model.parameters(), {.broadcast_parameters = false});
    for (int s = 3; s < 6; ++s) second.push_back(train_step(model, opt, dp, world.rank(), s));
  }
  REQUIRE(std::memcmp(first.data(), second.data(), first.size() * sizeof(float)) == 0);
  barrier(world);
  if (world.rank() == 0) fs::remove_all(file.parent_path());
}

TEST_CASE("mpi: sharded stages 1, 2 and 3 match data_parallel over the ring bit for bit",
          "[mpi][train][zero]") {
  auto world = mpi::world();
  const auto run = [&](int stage) {
    ad::mlp model({8, 19, 3}, ad::activation::relu, 10 + static_cast<unsigned>(world.rank()));
    std::vector<std::vector<float>> after;
    const auto steps = [&](auto& trainer, ad::adamw& opt) {
      for (int step = 0; step < 4; ++step) {
        const auto x = inputs(4 * 8, static_cast<unsigned>(100 * step + world.rank()));
        const std::vector<int> y = {0, 1, 2, (world.rank() + step) % 3};
        opt.set_lr(1e-2 / (1 + step));
        opt.zero_grad();
        trainer.backward(ad::softmax_cross_entropy(model(ad::tensor::from_data(x.data(), {4, 8})),
                                                   std::span<const int>(y)));
        trainer.step(opt);
        if (stage == 3) continue;  // whole only at the end (below)
        auto v = model.parameters().all_values();
        after.emplace_back(v.begin(), v.end());
      }
    };
    if (stage == 0) {
      train::data_parallel dp(
          world, model.parameters(),
          {.bucket_cap_bytes = 256, .first_bucket_cap_bytes = 64, .coll = {algo::ring, 0}});
      ad::adamw opt(model.parameters(), {.lr = 1e-2});
      steps(dp, opt);
    } else {
      train::sharded_data_parallel sdp(
          world, model.parameters(),
          {.stage = stage, .bucket_cap_bytes = 256, .first_bucket_cap_bytes = 64});
      ad::adamw opt(sdp.shard(), {.lr = 1e-2});
      steps(sdp, opt);
      if (stage == 3) {
        // Every value came from the bucket gathers; unshard() makes them whole.
        sdp.unshard();
        after.assign(3, {});
        auto v = model.parameters().all_values();
        after.emplace_back(v.begin(), v.end());
      }
    }
    return after;
  };
  const auto plain = run(0);
  for (int stage : {1, 2, 3}) {
    INFO("stage " << stage);
    auto sharded = run(stage);
    REQUIRE(sharded.size() == plain.size());
    if (stage == 3) {
      for (std::size_t t = 0; t + 1 < plain.size(); ++t) sharded[t] = plain[t];
    }
    for (std::size_t t = 0; t < plain.size(); ++t) {
      REQUIRE(std::memcmp(sharded[t].data(), plain[t].data(), plain[t].size() * sizeof(float)) ==
              0);
      REQUIRE(same_on_all_ranks(world, sharded[t]));
    }
  }
}

TEST_CASE("mpi: join with the last rank 10% short averages over the contributors",
          "[mpi][train][join]") {
  auto world = mpi::world();
  const int p = world.size();
  const int full = 20;
  const int mine = p > 1 && world.rank() == p - 1 ? 18 : full;
  const auto batch = [&](ad::mlp& m, int rank, int step) {
    const auto x = inputs(4 * 8, static_cast<unsigned>(100 * step + rank));
    const std::vector<int> y = {0, 1, 2, (rank + step) % 3};
    // from_matrix copies: the graph outlives `x` (from_data would only view it).
    const ad::matrix<float> xm = Eigen::Map<const ad::matrix<float>>(x.data(), 4, 8);
    return ad::softmax_cross_entropy(m(ad::tensor::from_matrix(xm)), std::span<const int>(y));
  };
  const auto run = [&](int stage) {
    ad::mlp model({8, 19, 3}, ad::activation::relu, 10 + static_cast<unsigned>(world.rank()));
    std::vector<std::vector<float>> after;
    std::vector<int> contributing;
    double worst = 0;
    // This rank's own gradient at the current parameters (zeros once it has
    // joined), summed over the ranks in double and divided by the
    // contributors: the average by hand, checked against the trainer's.
    const auto check_average = [&](std::span<const float> averaged, int t, bool active) {
      ad::mlp copy({8, 19, 3}, ad::activation::relu, 1);
      const auto v = model.parameters().all_values();
      std::copy(v.begin(), v.end(), copy.parameters().all_values().begin());
      copy.zero_grad();
      std::vector<double> own(v.size(), 0.0);
      if (active) {
        batch(copy, world.rank(), t).backward();
        const auto g = copy.parameters().all_grads();
        own.assign(g.begin(), g.end());
      }
      double count = active ? 1 : 0;
      allreduce(world, std::span<double>(own), sum);
      allreduce(world, std::span<double>(&count, 1), sum);
      double d = 0, n = 0;
      for (std::size_t i = 0; i < own.size(); ++i) {
        const double want = own[i] / count;
        d += (averaged[i] - want) * (averaged[i] - want);
        n += want * want;
      }
      worst = std::max(worst, std::sqrt(d / n));
    };
    std::int64_t shadowed = 0;
    if (stage == 0) {
      train::data_parallel dp(world, model.parameters(),
                              {.bucket_cap_bytes = 256,
                               .first_bucket_cap_bytes = 64,
                               .coll = {algo::ring, 0},
                               .uneven_inputs = true});
      ad::adamw opt(model.parameters(), {.lr = 1e-2});
      const auto note = [&] {
        after.push_back(copy_of_values(model));
        contributing.push_back(dp.last_step().contributing_ranks);
      };
      for (int t = 0; t < mine; ++t) {
        opt.zero_grad();
        dp.backward(batch(model, world.rank(), t));
        dp.finish();
        check_average(model.parameters().all_grads(), t, true);
        opt.step();
        note();
      }
      bool first = true;
      shadowed = dp.join(opt, [&](std::int64_t t) {
        if (!first) after.push_back(copy_of_values(model));
        contributing.push_back(dp.last_step().contributing_ranks);
        first = false;
        check_average(model.parameters().all_grads(), static_cast<int>(t), false);
      });
      if (!first) after.push_back(copy_of_values(model));
    } else {
      train::sharded_data_parallel sdp(world, model.parameters(),
                                       {.stage = stage,
                                        .bucket_cap_bytes = 256,
                                        .first_bucket_cap_bytes = 64,
                                        .uneven_inputs = true});
      ad::adamw opt(sdp.shard(), {.lr = 1e-2});
      const auto note = [&] {
        after.push_back(copy_of_values(model));
        contributing.push_back(sdp.last_step().contributing_ranks);
      };
      for (int t = 0; t < mine; ++t) {
        opt.zero_grad();
        sdp.backward(batch(model, world.rank(), t));
        sdp.step(opt);
        note();
      }
      bool first = true;
      shadowed = sdp.join(opt, [&](std::int64_t) {
        if (!first) after.push_back(copy_of_values(model));
        contributing.push_back(sdp.last_step().contributing_ranks);
        first = false;
      });
      if (!first) after.push_back(copy_of_values(model));
    }
    REQUIRE(shadowed == full - mine);
    REQUIRE(after.size() == static_cast<std::size_t>(full));
    for (int t = 0; t < full; ++t) {
      REQUIRE(contributing[static_cast<std::size_t>(t)] == (t < 18 || p == 1 ? p : p - 1));
      REQUIRE(same_on_all_ranks(world, after[static_cast<std::size_t>(t)]));
    }
    if (stage == 0) REQUIRE(worst <= 1e-6);
    return after;
  };
  const auto plain = run(0);
  const auto sharded = run(2);
  for (std::size_t t = 0; t < plain.size(); ++t) {
    REQUIRE(std::memcmp(sharded[t].data(), plain[t].data(), plain[t].size() * sizeof(float)) == 0);
  }
}

TEST_CASE("mpi: a sharded checkpoint resumes at the same and at fewer ranks bit for bit",
          "[mpi][train][zero][checkpoint]") {
  auto world = mpi::world();
  const int p = world.size();
  std::string dir;
  if (world.rank() == 0) {
    dir = (fs::temp_directory_path() / ("ringflow_mpi_zero_ckpt_" + std::to_string(::getpid())))
              .string();
    fs::create_directories(dir);
  }
  std::int64_t len = static_cast<std::int64_t>(dir.size());
  broadcast(world, std::span<std::int64_t>(&len, 1), 0);
  std::vector<std::uint8_t> name(dir.begin(), dir.end());
  name.resize(static_cast<std::size_t>(len));
  broadcast(world, std::span<std::uint8_t>(name), 0);
  const fs::path file = fs::path(std::string(name.begin(), name.end())) / "zero.rfck";

  const auto steps = [](auto& trainer, ad::mlp& model, ad::adamw& opt, const communicator& c,
                        int from, int to, std::vector<std::vector<float>>* after) {
    for (int t = from; t < to; ++t) {
      const auto x = inputs(4 * 8, static_cast<unsigned>(100 * t + c.rank()));
      const std::vector<int> y = {0, 1, 2, (c.rank() + t) % 3};
      opt.set_lr(1e-2 / (1 + t));
      opt.zero_grad();
      trainer.backward(ad::softmax_cross_entropy(model(ad::tensor::from_data(x.data(), {4, 8})),
                                                 std::span<const int>(y)));
      trainer.step(opt);
      if (after != nullptr) after->push_back(copy_of_values(model));
    }
  };
  const train::sharded_data_parallel_options zero{
      .stage = 1, .bucket_cap_bytes = 256, .first_bucket_cap_bytes = 64};
  // Written at p ranks after 3 steps; the writers go on 3 more.
  std::vector<std::vector<float>> uninterrupted, resumed;
  {
    ad::mlp model({8, 19, 3}, ad::activation::relu, 10 + static_cast<unsigned>(world.rank()));
    train::sharded_data_parallel sdp(world, model.parameters(), zero);
    ad::adamw opt(sdp.shard(), {.lr = 1e-2});
    steps(sdp, model, opt, world, 0, 3, nullptr);
    train::training_state st{.params = model.parameters(),
                             .optimizer = train::optimizer_state_of(opt, sdp.owned()),
                             .step = 3,
                             .world_size = p};
    train::save_checkpoint(world, file, st);
    steps(sdp, model, opt, world, 3, 6, &uninterrupted);
  }
  {
    // Fresh objects at the same rank count, stage 2 this time: the uninterrupted run.
    ad::mlp model({8, 19, 3}, ad::activation::relu, 77);
    auto two = zero;
    two.stage = 2;
    train::sharded_data_parallel sdp(world, model.parameters(), two);
    ad::adamw opt(sdp.shard(), {.lr = 1e-2});
    train::training_state st{.params = model.parameters(),
                             .optimizer = train::optimizer_state_of(opt, sdp.owned())};
    train::load_checkpoint(world, file, st);
    REQUIRE(st.step == 3);
    steps(sdp, model, opt, world, 3, 6, &resumed);
  }
  REQUIRE(resumed.size() == uninterrupted.size());
  for (std::size_t t = 0; t < resumed.size(); ++t) {
    REQUIRE(std::memcmp(resumed[t].data(), uninterrupted[t].data(),
                        resumed[t].size() * sizeof(float)) == 0);
  }
  if (p > 1) {
    // On p - 1 ranks: the sharded trainer and data_parallel over the ring,
    // both resumed from the file, agree bit for bit.
    const int q = p - 1;
    const bool in = world.rank() < q;
    auto sub = world.split(in ? 0 : 1, world.rank());
    if (in) {
      std::vector<std::vector<float>> sharded, plain;
      {
        ad::mlp model({8, 19, 3}, ad::activation::relu, 5);
        train::sharded_data_parallel sdp(sub, model.parameters(), zero);
        ad::adamw opt(sdp.shard(), {.lr = 1e-2});
        train::training_state st{.params = model.parameters(),
                                 .optimizer = train::optimizer_state_of(opt, sdp.owned())};
        const auto info = train::load_checkpoint(sub, file, st);
        REQUIRE(info.world_size == p);
        REQUIRE(opt.steps() == 3);
        steps(sdp, model, opt, sub, 3, 6, &sharded);
      }
      {
        ad::mlp model({8, 19, 3}, ad::activation::relu, 6);
        train::data_parallel dp(
            sub, model.parameters(),
            {.bucket_cap_bytes = 256, .first_bucket_cap_bytes = 64, .coll = {algo::ring, 0}});
        ad::adamw opt(model.parameters(), {.lr = 1e-2});
        train::training_state st{.params = model.parameters(),
                                 .optimizer = train::optimizer_state_of(opt)};
        train::load_checkpoint(sub, file, st);
        steps(dp, model, opt, sub, 3, 6, &plain);
      }
      for (std::size_t t = 0; t < plain.size(); ++t) {
        REQUIRE(std::memcmp(sharded[t].data(), plain[t].data(), plain[t].size() * sizeof(float)) ==
                0);
        REQUIRE(same_on_all_ranks(sub, sharded[t]));
      }
    }
  }
  barrier(world);
  if (world.rank() == 0) fs::remove_all(file.parent_path());
}
