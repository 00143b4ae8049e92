// sharded_data_parallel (ZeRO 1/2) and no_sync on the thread backend: bitwise equality with
// data_parallel over the ring, memory and traffic counters, accumulation, errors.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "ringflow/ad/autodiff.hpp"
#include "ringflow/backends/local.hpp"
#include "ringflow/train/checkpoint.hpp"
#include "ringflow/train/data_parallel.hpp"
#include "ringflow/train/sharded_data_parallel.hpp"
#include "support/catch.hpp"
#include "support/noise.hpp"

using namespace ringflow;

namespace {

using ringflow::testing::noise;

// `n` samples of `features` inputs with 4 classes, drawn from `seed`.
ad::tensor loss_of(ad::mlp& model, std::size_t n, std::size_t features, std::uint64_t seed,
                   float scale = 1.0f) {
  const auto x = noise(n * features, seed);
  std::vector<int> y;
  for (std::size_t i = 0; i < n; ++i) y.push_back(static_cast<int>((i * 7 + seed) % 4));
  // from_matrix copies: the graph outlives `x` (from_data would only view it).
  const ad::matrix<float> m = Eigen::Map<const ad::matrix<float>>(
      x.data(), static_cast<ad::index>(n), static_cast<ad::index>(features));
  auto xt = ad::tensor::from_matrix(m);
  auto loss = ad::softmax_cross_entropy(model(xt), std::span<const int>(y));
  return scale == 1.0f ? loss : loss * scale;
}

template <class R, class Body>
std::vector<R> per_rank(int n, Body body) {
  std::vector<R> out(static_cast<std::size_t>(n));
  local::run(n, [&](communicator& c) { out[static_cast<std::size_t>(c.rank())] = body(c); });
  return out;
}

std::vector<float> copy_of(std::span<const float> s) { return {s.begin(), s.end()}; }

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

// Counts the payload bytes every isend of a transport (and of its splits,
// where the trainers' progress threads run) puts on the wire.
class counting_transport final : public transport {
 public:
  counting_transport(std::shared_ptr<transport> inner,
                     std::shared_ptr<std::atomic<std::uint64_t>> n)
      : inner_(std::move(inner)), sent_(std::move(n)) {}
  int rank() const noexcept override { return inner_->rank(); }
  int size() const noexcept override { return inner_->size(); }
  std::string_view name() const noexcept override { return inner_->name(); }
  request isend(const void* data, std::size_t bytes, int peer, int tag) override {
    *sent_ += bytes;
    return inner_->isend(data, bytes, peer, tag);
  }
  request irecv(void* data, std::size_t bytes, int peer, int tag) override {
    return inner_->irecv(data, bytes, peer, tag);
  }
  std::shared_ptr<transport> split(int color, int key) override {
    auto t = inner_->split(color, key);
    return t ? std::make_shared<counting_transport>(std::move(t), sent_) : nullptr;
  }
  bool concurrent_use_ok() const noexcept override { return inner_->concurrent_use_ok(); }

 private:
  std::shared_ptr<transport> inner_;
  std::shared_ptr<std::atomic<std::uint64_t>> sent_;
};

struct counted_comm {
  std::shared_ptr<std::atomic<std::uint64_t>> sent =
      std::make_shared<std::atomic<std::uint64_t>>(0);
  communicator comm;
  explicit counted_comm(communicator& c) {
    // Non-owning: `c` outlives this communicator inside local::run.
    std::shared_ptr<transport> inner(std::shared_ptr<void>(), &c.raw());
    comm = communicator(std::make_shared<counting_transport>(inner, sent));
    comm.set_check_mode(c.check_mode());
  }
};

// The model's parameter values; at stage 3 they are whole only inside
// full_parameters() (collective: every rank calls it).
template <class Trainer>
std::vector<float> values_of(Trainer& trainer, ad::module& model) {
  if constexpr (requires { trainer.full_parameters(); }) {
    const auto full = trainer.full_parameters();
    return copy_of(model.parameters().all_values());
  } else {
    return copy_of(model.parameters().all_values());
  }
}

const std::vector<ad::index> model_sizes = {10, 24, 17, 4};  // odd sizes: uneven pieces
constexpr std::size_t features = 10;
constexpr std::size_t local_batch = 6;

// Learning rate of step t: warm-up then decay, so the schedule matters.
double lr_at(int t) { return 1e-2 * (t < 2 ? (t + 1) / 2.0 : 1.0 / (1 + 0.3 * (t - 2))); }

enum class opt_kind { adamw, sgd };

// Parameters after each of `steps` steps on this rank: stage 0 = data_parallel over the ring.
template <class Opt>
std::vector<std::vector<float>> run_training(communicator& c, int stage, Opt make_opt,
                                             std::size_t cap, int steps) {
  ad::mlp model(model_sizes, ad::activation::tanh, 3 + static_cast<unsigned>(c.rank()));
  std::vector<std::vector<float>> out;
  const auto one_step = [&](auto& trainer, auto& opt, int t) {
    opt.set_lr(lr_at(t));
    opt.zero_grad();
    model.zero_grad();
    trainer.backward(loss_of(model, local_batch, features, 100 * t + c.rank()));
    trainer.step(opt);
    out.push_back(copy_of(model.parameters().all_values()));
  };
  if (stage == 0) {
    train::data_parallel dp(
        c, model.parameters(),
        {.bucket_cap_bytes = cap, .first_bucket_cap_bytes = cap / 2, .coll = {algo::ring, 0}});
    auto opt = make_opt(model.parameters());
    for (int t = 0; t < steps; ++t) one_step(dp, opt, t);
  } else {
    train::sharded_data_parallel sdp(
        c, model.parameters(),
        {.stage = stage, .bucket_cap_bytes = cap, .first_bucket_cap_bytes = cap / 2});
    auto opt = make_opt(sdp.shard());
    for (int t = 0; t < steps; ++t) one_step(sdp, opt, t);
  }
  return out;
}

}  // namespace

TEST_CASE("sharded stages 1 and 2: parameters bitwise equal to data_parallel over the ring",
          "[train][zero]") {
  const int steps = 5;
  const auto adamw = [](ad::parameter_store<float> p) {
    return ad::adamw(p, {.lr = 1e-2, .weight_decay = 0.05});
  };
  const auto sgd = [](ad::parameter_store<float> p) {
    return ad::sgd(p, {.lr = 1e-2, .momentum = 0.9, .nesterov = true, .weight_decay = 1e-3});
  };
  for (int p : {1, 2, 3, 4}) {
    for (std::size_t cap : {std::size_t{0}, std::size_t{512}, train::default_bucket_cap_bytes}) {
      for (opt_kind k : {opt_kind::adamw, opt_kind::sgd}) {
        using result = std::vector<std::vector<float>>;
        const auto run = [&](int stage) {
          return per_rank<result>(p, [&](communicator& c) {
            return k == opt_kind::adamw ? run_training(c, stage, adamw, cap, steps)
                                        : run_training(c, stage, sgd, cap, steps);
          });
        };
        const auto plain = run(0);
        for (int stage : {1, 2}) {
          INFO("ranks " << p << " cap " << cap << " stage " << stage << " optimizer "
                        << (k == opt_kind::adamw ? "adamw" : "sgd"));
          const auto sharded = run(stage);
          for (int r = 0; r < p; ++r) {
            const auto& mine = sharded[static_cast<std::size_t>(r)];
            REQUIRE(mine.size() == static_cast<std::size_t>(steps));
            for (int t = 0; t < steps; ++t) {
              INFO("rank " << r << " step " << t);
              REQUIRE(same_bits(mine[static_cast<std::size_t>(t)],
                                plain[static_cast<std::size_t>(r)][static_cast<std::size_t>(t)]));
            }
          }
          // Training moved the parameters (the comparison is not of initial values).
          REQUIRE(!same_bits(plain[0].front(), plain[0].back()));
        }
      }
    }
  }
}

TEST_CASE("sharded: parameters unused on some ranks contribute zero, as in data_parallel",
          "[train][zero][unused]") {
  // y = x W1 (+ x W2 on even ranks); W3 unused everywhere; one bucket per parameter.
  using result = std::vector<std::vector<float>>;
  const auto run = [](int p, int stage) {
    return per_rank<result>(p, [stage](communicator& c) {
      ad::parameter_store<float> store;
      auto w1 = store.add("w1", {3, 2});
      auto w2 = store.add("w2", {3, 2});
      store.add("w3", {3, 2});
      const auto init = noise(store.numel(), 9);
      std::copy(init.begin(), init.end(), store.all_values().begin());
      const auto x = noise(6, 50 + static_cast<unsigned>(c.rank()));
      auto xt = ad::tensor::from_data(x.data(), {2, 3});
      result out;
      const auto body = [&](auto& trainer, ad::adamw& opt) {
        for (int t = 0; t < 3; ++t) {
          opt.zero_grad();
          auto y = ad::matmul(xt, w1);
          if (c.rank() % 2 == 0) y = y + ad::matmul(xt, w2);
          trainer.backward(ad::sum(y * y));
          trainer.step(opt);
          out.push_back(copy_of(store.all_values()));
        }
      };
      if (stage == 0) {
        train::data_parallel dp(
            c, store,
            {.bucket_cap_bytes = 0, .first_bucket_cap_bytes = 0, .coll = {algo::ring, 0}});
        ad::adamw opt(store, {.lr = 0.1});
        body(dp, opt);
      } else {
        train::sharded_data_parallel sdp(
            c, store, {.stage = stage, .bucket_cap_bytes = 0, .first_bucket_cap_bytes = 0});
        ad::adamw opt(sdp.shard(), {.lr = 0.1});
        body(sdp, opt);
      }
      return out;
    });
  };
  for (int p : {2, 3}) {
    const auto plain = run(p, 0);
    for (int stage : {1, 2}) {
      INFO("ranks " << p << " stage " << stage);
      const auto sharded = run(p, stage);
      for (int r = 0; r < p; ++r) {
        for (std::size_t t = 0; t < 3; ++t) {
          REQUIRE(same_bits(sharded[static_cast<std::size_t>(r)][t],
                            plain[static_cast<std::size_t>(r)][t]));
        }
      }
    }
  }
}

TEST_CASE("sharded memory counters at 4 ranks with AdamW: state and gradients about 1/4",
          "[train][zero][memory]") {
  struct result {
    train::memory_stats plain, stage1, stage2;
    std::size_t numel = 0, shard1 = 0, shard2 = 0, peak2 = 0, buckets2 = 0;
    bool repacked = false;
  };
  const std::vector<ad::index> sizes = {64, 256, 128, 10};  // 50k parameters, 3 buckets at 64 KiB
  const auto res = per_rank<result>(4, [&](communicator& c) {
    result out;
    ad::mlp model(sizes, ad::activation::relu, 5);
    out.numel = model.parameters().numel();
    const train::data_parallel_options dpo{.bucket_cap_bytes = 64 * 1024};
    {
      train::data_parallel dp(c, model.parameters(), dpo);
      ad::adamw opt(model.parameters());
      opt.zero_grad();
      dp.backward(loss_of(model, 4, 64, c.rank()));
      dp.step(opt);
      out.plain = dp.memory(opt);
    }
    for (int stage : {1, 2}) {
      train::sharded_data_parallel sdp(c, model.parameters(),
                                       {.stage = stage, .bucket_cap_bytes = 64 * 1024});
      ad::adamw opt(sdp.shard());
      opt.zero_grad();
      sdp.backward(loss_of(model, 4, 64, c.rank()));
      sdp.step(opt);
      (stage == 1 ? out.stage1 : out.stage2) = sdp.memory(opt);
      (stage == 1 ? out.shard1 : out.shard2) = sdp.shard().numel();
      if (stage == 2) {
        out.peak2 = sdp.peak_gradient_bytes();
        out.buckets2 = sdp.buckets().size();
      }
    }
    // The stage-2 trainer gave the model its flat gradient buffer back.
    out.repacked = !model.parameters().grads_released() &&
                   model.parameters().all_grads().size() == model.parameters().numel();
    return out;
  });
  for (int r = 0; r < 4; ++r) {
    const auto& m = res[static_cast<std::size_t>(r)];
    INFO("rank " << r);
    const double n = static_cast<double>(m.numel) * sizeof(float);
    REQUIRE(m.repacked);
    // Replicated: everything is numel floats (AdamW: two moments).
    REQUIRE(m.plain.parameter_bytes == m.numel * sizeof(float));
    REQUIRE(m.plain.gradient_bytes == m.numel * sizeof(float));
    REQUIRE(m.plain.optimizer_state_bytes == 2 * m.numel * sizeof(float));
    // Stage 1: the optimizer state is this rank's pieces only.
    REQUIRE(m.stage1.optimizer_state_bytes == 2 * m.shard1 * sizeof(float));
    const double s1 = static_cast<double>(m.stage1.optimizer_state_bytes) /
                      static_cast<double>(m.plain.optimizer_state_bytes);
    REQUIRE(s1 == Catch::Approx(0.25).margin(0.01));
    // Stage 1 keeps the full gradient buffer (plus the shard's averaged piece).
    REQUIRE(m.stage1.gradient_bytes == (m.numel + m.shard1) * sizeof(float));
    // Stage 2: between steps only the shard's averaged gradients are held.
    const double g2 = static_cast<double>(m.stage2.gradient_bytes) / n;
    REQUIRE(g2 == Catch::Approx(0.25).margin(0.01));
    REQUIRE(m.stage2.optimizer_state_bytes == m.stage1.optimizer_state_bytes);
    REQUIRE(m.peak2 >= m.stage2.gradient_bytes);
    // At worst every bucket's buffer (64 bytes of alignment slack each) at once.
    REQUIRE(m.buckets2 > 1);
    REQUIRE(m.peak2 <= static_cast<std::size_t>(n) + 64 * m.buckets2 + m.stage2.gradient_bytes);
    // Parameters: the full model plus the shard's copy of this rank's pieces.
    REQUIRE(m.stage2.parameter_bytes == (m.numel + m.shard2) * sizeof(float));
  }
}

TEST_CASE("bytes sent per step: counted exactly, and the ring formula 2(p-1)/p within 5%",
          "[train][zero][traffic]") {
  for (int p : {2, 3, 4}) {
    struct result {
      std::uint64_t measured[3] = {0, 0, 0};
      std::uint64_t counted[3] = {0, 0, 0};
      std::size_t numel = 0;
    };
    const auto res = per_rank<result>(p, [&](communicator& c) {
      result out;
      counted_comm cc(c);
      ad::mlp model({64, 256, 128, 10}, ad::activation::relu, 5);
      out.numel = model.parameters().numel();
      for (int stage = 0; stage < 3; ++stage) {
        const auto measure = [&](auto& trainer, auto& opt) {
          for (int t = 0; t < 2; ++t) {  // the second step is the one measured
            const std::uint64_t before = cc.sent->load();
            opt.zero_grad();
            trainer.backward(loss_of(model, 4, 64, 10 * t + c.rank()));
            trainer.step(opt);
            out.measured[stage] = cc.sent->load() - before;
            out.counted[stage] = trainer.last_step().bytes_sent;
          }
        };
        if (stage == 0) {
          train::data_parallel dp(cc.comm, model.parameters(), {.coll = {algo::ring, 0}});
          ad::adamw opt(model.parameters());
          measure(dp, opt);
        } else {
          train::sharded_data_parallel sdp(cc.comm, model.parameters(), {.stage = stage});
          ad::adamw opt(sdp.shard());
          measure(sdp, opt);
        }
      }
      return out;
    });
    for (int r = 0; r < p; ++r) {
      const auto& m = res[static_cast<std::size_t>(r)];
      const double formula = 2.0 * (p - 1) / p * static_cast<double>(m.numel * sizeof(float));
      for (int stage = 0; stage < 3; ++stage) {
        INFO("ranks " << p << " rank " << r << " stage " << stage << " measured "
                      << m.measured[stage] << " formula " << formula);
        REQUIRE(m.counted[stage] == m.measured[stage]);
        REQUIRE(std::abs(static_cast<double>(m.measured[stage]) - formula) <= 0.05 * formula);
      }
    }
  }
}

TEST_CASE("uneven_inputs: the per-step count is in bytes_sent, exactly", "[train][join][traffic]") {
  for (int p : {2, 3, 4}) {
    struct result {
      std::uint64_t measured[3] = {0, 0, 0};
      std::uint64_t counted[3] = {0, 0, 0};
      std::uint64_t without[3] = {0, 0, 0};  // counted with the option off
      int contributing[3] = {0, 0, 0};
    };
    const auto res = per_rank<result>(p, [&](communicator& c) {
      result out;
      counted_comm cc(c);
      ad::mlp model(model_sizes, ad::activation::tanh, 5);
      for (int stage = 0; stage < 3; ++stage) {
        for (const bool uneven : {false, true}) {
          const auto measure = [&](auto& trainer, auto& opt) {
            for (int t = 0; t < 2; ++t) {
              const std::uint64_t before = cc.sent->load();
              opt.zero_grad();
              trainer.backward(loss_of(model, local_batch, features, 10 * t + c.rank()));
              trainer.step(opt);
              if (!uneven) {
                out.without[stage] = trainer.last_step().bytes_sent;
                continue;
              }
              out.measured[stage] = cc.sent->load() - before;
              out.counted[stage] = trainer.last_step().bytes_sent;
              out.contributing[stage] = trainer.last_step().contributing_ranks;
            }
          };
          if (stage == 0) {
            train::data_parallel dp(cc.comm, model.parameters(),
                                    {.coll = {algo::ring, 0}, .uneven_inputs = uneven});
            ad::adamw opt(model.parameters());
            measure(dp, opt);
          } else {
            train::sharded_data_parallel sdp(cc.comm, model.parameters(),
                                             {.stage = stage, .uneven_inputs = uneven});
            ad::adamw opt(sdp.shard());
            measure(sdp, opt);
          }
        }
      }
      return out;
    });
    for (int r = 0; r < p; ++r) {
      const auto& m = res[static_cast<std::size_t>(r)];
      for (int stage = 0; stage < 3; ++stage) {
        INFO("ranks " << p << " rank " << r << " stage " << stage);
        REQUIRE(m.counted[stage] == m.measured[stage]);
        REQUIRE(m.contributing[stage] == p);
        // The count: one int32 over the ring (4 or 8 bytes from this rank).
        REQUIRE(m.counted[stage] ==
                m.without[stage] + train::ring_bytes_sent(1, 4, p, r, true, true));
        REQUIRE(m.counted[stage] > m.without[stage]);
      }
    }
  }
}

namespace {
// The gradient after k micro-batches accumulated under no_sync (each loss
// scaled by 1/k) and the bytes sent, for stage 0 (data_parallel), 1 or 2;
// with `synced`, k separate reductions instead (bytes only).
struct accumulation {
  std::vector<float> grad;  // the averaged gradient (stage 1/2: this rank's pieces)
  std::vector<chunk> owned;
  std::uint64_t bytes = 0;
  std::uint64_t counted = 0;
  std::size_t accumulated = 0;
};

template <class Trainer>
void micro_batches(Trainer& trainer, ad::mlp& model, communicator& c, int k, bool synced,
                   accumulation& out) {
  const float scale = 1.0f / static_cast<float>(k);
  const auto seed_of = [&](int i) { return 1000u * static_cast<unsigned>(c.rank()) + i; };
  for (int i = 0; i < k; ++i) {
    if (synced) {
      model.zero_grad();
      trainer.backward(loss_of(model, local_batch, features, seed_of(i), scale));
      trainer.finish();
      out.counted += trainer.last_step().bytes_sent;
    } else if (i + 1 < k) {
      auto ns = trainer.no_sync();
      trainer.backward(loss_of(model, local_batch, features, seed_of(i), scale));
    } else {
      trainer.backward(loss_of(model, local_batch, features, seed_of(i), scale));
      trainer.finish();
      out.counted = trainer.last_step().bytes_sent;
      out.accumulated = trainer.last_step().accumulated_backwards;
    }
  }
}

accumulation accumulate(communicator& c, int stage, int k, bool synced) {
  accumulation out;
  counted_comm cc(c);
  ad::mlp model(model_sizes, ad::activation::tanh, 3);
  if (stage == 0) {
    train::data_parallel dp(cc.comm, model.parameters(), {.coll = {algo::ring, 0}});
    const std::uint64_t before = cc.sent->load();
    micro_batches(dp, model, c, k, synced, out);
    out.bytes = cc.sent->load() - before;
    out.grad = copy_of(model.parameters().all_grads());
    return out;
  }
  train::sharded_data_parallel sdp(cc.comm, model.parameters(), {.stage = stage});
  const std::uint64_t before = cc.sent->load();
  micro_batches(sdp, model, c, k, synced, out);
  out.bytes = cc.sent->load() - before;
  out.grad = copy_of(sdp.shard().all_grads());
  out.owned = sdp.owned();
  return out;
}
}  // namespace

TEST_CASE("no_sync: k backwards, one reduction, the gradient of the k-times batch",
          "[train][zero][accumulate]") {
  const int k = 4;
  for (int p : {1, 2, 3}) {
    // Reference: one process, every rank's k micro-batches as one batch.
    ad::mlp ref(model_sizes, ad::activation::tanh, 3);
    ref.zero_grad();
    {
      std::vector<float> x;
      std::vector<int> y;
      for (int r = 0; r < p; ++r) {
        for (int i = 0; i < k; ++i) {
          const std::uint64_t seed = 1000u * static_cast<unsigned>(r) + i;
          const auto xs = noise(local_batch * features, seed);
          x.insert(x.end(), xs.begin(), xs.end());
          for (std::size_t j = 0; j < local_batch; ++j)
            y.push_back(static_cast<int>((j * 7 + seed) % 4));
        }
      }
      const auto n = static_cast<ad::index>(y.size());
      ad::softmax_cross_entropy(ref(ad::tensor::from_data(x.data(), {n, features})),
                                std::span<const int>(y))
          .backward();
    }
    const auto want = copy_of(ref.parameters().all_grads());
    const auto rel_err = [](std::span<const float> a, std::span<const float> b) {
      double d = 0, nb = 0;
      for (std::size_t i = 0; i < a.size(); ++i) {
        d += (static_cast<double>(a[i]) - b[i]) * (static_cast<double>(a[i]) - b[i]);
        nb += static_cast<double>(b[i]) * b[i];
      }
      return std::sqrt(d / nb);
    };
    // Stage 3 with one bucket: under no_sync its values stay gathered across
    // the k backwards, so the parameter gathers shrink by k as well.
    for (int stage : {0, 1, 2, 3}) {
      INFO("ranks " << p << " stage " << stage);
      const auto synced =
          per_rank<accumulation>(p, [&](communicator& c) { return accumulate(c, stage, k, true); });
      const auto res = per_rank<accumulation>(
          p, [&](communicator& c) { return accumulate(c, stage, k, false); });
      for (int r = 0; r < p; ++r) {
        const auto& m = res[static_cast<std::size_t>(r)];
        INFO("rank " << r);
        REQUIRE(m.accumulated == static_cast<std::size_t>(k - 1));
        REQUIRE(m.counted == m.bytes);
        // One reduction: exactly 1/k of the bytes of k synced steps.
        REQUIRE(m.bytes * k == synced[static_cast<std::size_t>(r)].bytes);
        REQUIRE(synced[static_cast<std::size_t>(r)].counted ==
                synced[static_cast<std::size_t>(r)].bytes);
        if (p > 1) REQUIRE(m.bytes > 0);
        if (stage == 0) {
          REQUIRE(rel_err(m.grad, want) <= 1e-6);
        } else {
          std::vector<float> mine;  // the reference's values at this rank's pieces
          for (const auto& o : m.owned) {
            mine.insert(mine.end(), want.begin() + static_cast<std::ptrdiff_t>(o.offset),
                        want.begin() + static_cast<std::ptrdiff_t>(o.offset + o.count));
          }
          REQUIRE(mine.size() == m.grad.size());
          REQUIRE(rel_err(m.grad, mine) <= 1e-6);
        }
      }
    }
  }
}

TEST_CASE("no_sync and sharded usage errors name the problem and the rank",
          "[train][zero][errors]") {
  const auto errs = per_rank<std::vector<std::string>>(2, [](communicator& c) {
    std::vector<std::string> out;
    ad::mlp model({4, 5, 2}, ad::activation::relu, 1);
    const auto expect = [&](auto&& f) {
      try {
        f();
        out.push_back("(no error)");
      } catch (const error& e) {
        out.push_back(e.what());
      }
    };
    expect([&] {
      train::sharded_data_parallel s(c, model.parameters(), {.stage = 3, .uneven_inputs = true});
    });
    expect([&] { train::sharded_data_parallel s(c, model.parameters(), {.stage = 7}); });
    expect([&] { train::sharded_data_parallel s(c, model.parameters(), {.stage = 0}); });
    expect([&] {
      train::sharded_data_parallel s(c, model.parameters(), {.coll = {algo::tree, 0}});
    });
    expect([&] { train::sharded_data_parallel s(c, ad::parameter_store<float>{}); });
    const std::vector<float> x(8, 0.5f);
    {
      train::sharded_data_parallel sdp(c, model.parameters(), {.stage = 2});
      ad::adamw wrong(model.parameters());
      expect([&] { sdp.step(wrong); });
      // A second backward without no_sync is still refused.
      auto loss = ad::sum(model(ad::tensor::from_data(x.data(), {2, 4})));
      sdp.backward(loss);
      expect([&] { sdp.backward(ad::sum(model(ad::tensor::from_data(x.data(), {2, 4})))); });
      sdp.finish();
      {
        auto ns = sdp.no_sync();
        expect([&] { sdp.finish(); });
      }
      sdp.finish();
    }
    {
      train::data_parallel dp(c, model.parameters());
      auto ns = dp.no_sync();
      expect([&] { dp.finish(); });
      expect([&] { auto again = dp.no_sync(); });
    }
    return out;
  });
  for (int r = 0; r < 2; ++r) {
    const auto& e = errs[static_cast<std::size_t>(r)];
    REQUIRE(e.size() == 10);
    const std::string rank = "rank " + std::to_string(r);
    const std::vector<std::string> want = {"stage 3", "stage 7", "data_parallel", "algo::tree",
                                           "empty",   "shard()", "twice",         "no_sync",
                                           "no_sync", "no_sync"};
    for (std::size_t i = 0; i < e.size(); ++i) {
      INFO(e[i]);
      REQUIRE(e[i].find(want[i]) != std::string::npos);
      REQUIRE(e[i].find(rank) != std::string::npos);
    }
  }
}

TEST_CASE("sharded clip_grad_norm uses the norm over all ranks", "[train][zero]") {
  const int p = 3;
  struct result {
    double norm_plain = 0, norm_sharded = 0;
  };
  const auto res = per_rank<result>(p, [](communicator& c) {
    result out;
    ad::mlp model(model_sizes, ad::activation::tanh, 3);
    {
      train::data_parallel dp(c, model.parameters(), {.coll = {algo::ring, 0}});
      model.zero_grad();
      dp.backward(loss_of(model, local_batch, features, c.rank()));
      dp.finish();
      out.norm_plain = ad::clip_grad_norm(model.parameters(), 1e9);
    }
    train::sharded_data_parallel sdp(c, model.parameters(), {.stage = 2});
    sdp.backward(loss_of(model, local_batch, features, c.rank()));
    sdp.finish();
    out.norm_sharded = sdp.clip_grad_norm(1e-3);
    // After clipping, the global norm is the cap.
    const double after = sdp.clip_grad_norm(1e9);
    if (std::abs(after - 1e-3) > 1e-8) out.norm_sharded = -1;
    return out;
  });
  for (const auto& r : res) {
    REQUIRE(r.norm_plain > 0);
    REQUIRE(r.norm_sharded == Catch::Approx(r.norm_plain).epsilon(1e-5));
  }
}

TEST_CASE("collective checkpoints refuse sharded optimizer state without its pieces on every rank",
          "[train][zero][errors]") {
  const auto errs = per_rank<std::string>(3, [](communicator& c) -> std::string {
    ad::mlp model(model_sizes, ad::activation::tanh, 3);
    train::sharded_data_parallel sdp(c, model.parameters(), {.stage = 1});
    ad::adamw opt(sdp.shard());
    train::training_state st{.params = model.parameters(),
                             .optimizer = train::optimizer_state_of(opt)};
    try {
      train::save_checkpoint(c, "/nonexistent/never_written.rfck", st);
    } catch (const train::checkpoint_error& e) {
      return e.what();
    }
    return "(no error)";
  });
  for (const auto& e : errs) {
    INFO(e);
    REQUIRE(e.find("sharded optimizer state") != std::string::npos);
    REQUIRE(e.find("rank ") != std::string::npos);
  }
}

TEST_CASE("sharded: finish(), clip_grad_norm(), step() updates with the clipped gradient",
          "[train][zero]") {
  for (int stage : {1, 2}) {
    INFO("stage " << stage);
    struct result {
      std::vector<float> init, plain, unclipped, clipped;
    };
    const auto res = per_rank<result>(2, [stage](communicator& c) {
      result out;
      // kind 0: step(); 1: finish, clip by a huge cap, step; 2: clip to 1e-3.
      for (int kind = 0; kind < 3; ++kind) {
        ad::mlp model(model_sizes, ad::activation::tanh, 3);
        train::sharded_data_parallel sdp(c, model.parameters(), {.stage = stage});
        ad::sgd opt(sdp.shard(), {.lr = 0.1});
        if (kind == 0) out.init = copy_of(model.parameters().all_values());
        opt.zero_grad();
        sdp.backward(loss_of(model, local_batch, features, c.rank()));
        if (kind > 0) {
          sdp.finish();
          sdp.clip_grad_norm(kind == 1 ? 1e9 : 1e-3);
        }
        sdp.step(opt);
        (kind == 0   ? out.plain
         : kind == 1 ? out.unclipped
                     : out.clipped) = copy_of(model.parameters().all_values());
      }
      return out;
    });
    for (const auto& r : res) {
      REQUIRE(same_bits(r.unclipped, r.plain));
      double full = 0, small = 0;
      for (std::size_t i = 0; i < r.init.size(); ++i) {
        full += std::abs(r.plain[i] - r.init[i]);
        small += std::abs(r.clipped[i] - r.init[i]);
      }
      REQUIRE(full > 0);
      REQUIRE(small > 0);
      REQUIRE(small < 0.5 * full);  // clipped to a norm of 1e-3: a much smaller step
    }
  }
}

TEST_CASE("stage 3: gathered on read, prefetched, dropped; bitwise equal without gathering",
          "[train][zero][zero3]") {
  // Small buckets (one per parameter at cap 0), no full_parameters() between
  // the steps: every value of every step comes from the bucket gathers.
  const int steps = 4;
  const auto adamw = [](ad::parameter_store<float> p) {
    return ad::adamw(p, {.lr = 1e-2, .weight_decay = 0.05});
  };
  for (int p : {1, 2, 3, 4}) {
    for (std::size_t cap : {std::size_t{0}, std::size_t{512}}) {
      struct result {
        std::vector<float> values;
        std::size_t gathers = 0, prefetched = 0, buckets = 0, peak = 0, shard = 0;
        std::size_t largest = 0, numel = 0;
        bool released = false;
      };
      const auto run = [&](int stage) {
        return per_rank<result>(p, [&](communicator& c) {
          result out;
          ad::mlp model(model_sizes, ad::activation::tanh, 3 + static_cast<unsigned>(c.rank()));
          out.numel = model.parameters().numel();
          const auto train_with = [&](auto& trainer, auto& opt) {
            for (int t = 0; t < steps; ++t) {
              opt.set_lr(lr_at(t));
              opt.zero_grad();
              trainer.backward(loss_of(model, local_batch, features, 100 * t + c.rank()));
              trainer.step(opt);
            }
          };
          if (stage == 0) {
            train::data_parallel dp(c, model.parameters(),
                                    {.bucket_cap_bytes = cap,
                                     .first_bucket_cap_bytes = cap / 2,
                                     .coll = {algo::ring, 0}});
            auto opt = adamw(model.parameters());
            train_with(dp, opt);
            out.values = copy_of(model.parameters().all_values());
          } else {
            train::sharded_data_parallel sdp(
                c, model.parameters(),
                {.stage = 3, .bucket_cap_bytes = cap, .first_bucket_cap_bytes = cap / 2});
            // Released: the store keeps no flat values, the count is unchanged.
            // (Checked outside the ranks: Catch2's assertions are not thread-safe.)
            out.released = model.parameters().values_released() &&
                           model.parameters().all_values().empty() &&
                           model.parameters().numel() == out.numel;
            auto opt = adamw(sdp.shard());
            train_with(sdp, opt);
            out.gathers = sdp.last_step().parameter_gathers;
            out.prefetched = sdp.last_step().prefetched_gathers;
            out.buckets = sdp.buckets().size();
            out.peak = sdp.peak_parameter_bytes();
            out.shard = sdp.shard().numel();
            for (const auto& b : sdp.buckets()) out.largest = std::max(out.largest, b.size);
            out.values = values_of(sdp, model);
            sdp.unshard();  // the model outlives the trainer
          }
          return out;
        });
      };
      const auto plain = run(0);
      const auto sharded = run(3);
      for (int r = 0; r < p; ++r) {
        const auto& m = sharded[static_cast<std::size_t>(r)];
        INFO("ranks " << p << " cap " << cap << " rank " << r << " buckets " << m.buckets
                      << " gathers " << m.gathers << " prefetched " << m.prefetched);
        REQUIRE(m.released);
        REQUIRE(same_bits(m.values, plain[static_cast<std::size_t>(r)].values));
        // Every bucket gathered in the forward, the ones dropped since
        // gathered again in the backward; all but the first ahead of time.
        REQUIRE(m.gathers >= m.buckets);
        REQUIRE(m.gathers <= 2 * m.buckets);
        REQUIRE(m.prefetched + 2 >= m.gathers);
        // Never the whole model at once with many buckets: the shard plus at
        // most four buckets (three kept by a forward and one on its way).
        REQUIRE(m.buckets >= 5);
        const std::size_t pad = 64 / sizeof(float);
        REQUIRE(m.peak <= (m.shard + 4 * (m.largest + pad)) * sizeof(float));
        REQUIRE(m.peak < (m.numel + m.shard) * sizeof(float));
      }
    }
  }
}

TEST_CASE("stage 3 memory at 4 ranks: parameters about 1/4 plus the buckets in use",
          "[train][zero][zero3][memory]") {
  struct result {
    train::memory_stats between;
    std::size_t numel = 0, shard = 0, peak = 0, largest = 0, buckets = 0;
  };
  // Eight like layers of 96 x 96 (36 KiB each): one bucket each at 32 KiB.
  const std::vector<ad::index> sizes = {32, 96, 96, 96, 96, 96, 96, 96, 96, 10};
  const auto res = per_rank<result>(4, [&](communicator& c) {
    result out;
    ad::mlp model(sizes, ad::activation::relu, 5);
    out.numel = model.parameters().numel();
    train::sharded_data_parallel sdp(c, model.parameters(),
                                     {.stage = 3, .bucket_cap_bytes = 32 * 1024});
    ad::adamw opt(sdp.shard());
    for (int t = 0; t < 2; ++t) {
      opt.zero_grad();
      sdp.backward(loss_of(model, 4, 32, c.rank() + 10 * t));
      sdp.step(opt);
    }
    out.between = sdp.memory(opt);
    out.shard = sdp.shard().numel();
    out.peak = sdp.peak_parameter_bytes();
    out.buckets = sdp.buckets().size();
    for (const auto& b : sdp.buckets()) out.largest = std::max(out.largest, b.size);
    sdp.unshard();
    return out;
  });
  for (int r = 0; r < 4; ++r) {
    const auto& m = res[static_cast<std::size_t>(r)];
    INFO("rank " << r << " buckets " << m.buckets);
    const std::size_t pad = 64 / sizeof(float);
    // Between steps: the shard alone.
    REQUIRE(m.buckets >= 8);
    REQUIRE(m.between.parameter_bytes == m.shard * sizeof(float));
    REQUIRE(static_cast<double>(m.shard) / static_cast<double>(m.numel) ==
            Catch::Approx(0.25).margin(0.01));
    REQUIRE(m.peak <= (m.shard + 4 * (m.largest + pad)) * sizeof(float));
    REQUIRE(m.peak < 3 * m.numel * sizeof(float) / 4);
    // Gradients as at stage 2: the shard's averaged piece between steps.
    REQUIRE(m.between.gradient_bytes == m.shard * sizeof(float));
  }
}

TEST_CASE("stage 3 traffic: counted exactly; reduce-scatter plus two allgathers at most",
          "[train][zero][zero3][traffic]") {
  for (int p : {2, 3, 4}) {
    struct result {
      std::uint64_t measured = 0, counted = 0, rs = 0, ag = 0, ag_backward = 0;
      std::size_t buckets = 0;
    };
    const auto res = per_rank<result>(p, [&](communicator& c) {
      result out;
      counted_comm cc(c);
      ad::mlp model({64, 256, 128, 10}, ad::activation::relu, 5);
      {
        train::sharded_data_parallel sdp(cc.comm, model.parameters(),
                                         {.stage = 3, .bucket_cap_bytes = 16 * 1024});
        ad::adamw opt(sdp.shard());
        for (int t = 0; t < 3; ++t) {  // the last step is the one measured
          const std::uint64_t before = cc.sent->load();
          opt.zero_grad();
          sdp.backward(loss_of(model, 4, 64, 10 * t + c.rank()));
          sdp.step(opt);
          out.measured = cc.sent->load() - before;
          out.counted = sdp.last_step().bytes_sent;
        }
        for (std::size_t b = 0; b < sdp.buckets().size(); ++b) {
          const std::size_t n = sdp.buckets()[b].size;
          out.rs += train::ring_bytes_sent(n, 4, p, c.rank(), true, false);
          out.ag += train::ring_bytes_sent(n, 4, p, c.rank(), false, true);
          if (b >= 2) out.ag_backward += train::ring_bytes_sent(n, 4, p, c.rank(), false, true);
        }
        out.buckets = sdp.buckets().size();
        sdp.unshard();
      }
      return out;
    });
    for (int r = 0; r < p; ++r) {
      const auto& m = res[static_cast<std::size_t>(r)];
      INFO("ranks " << p << " rank " << r << " measured " << m.measured << " counted " << m.counted
                    << " rs " << m.rs << " ag " << m.ag);
      REQUIRE(m.buckets > 3);
      REQUIRE(m.counted == m.measured);
      // The forward gathers every bucket, the backward all but the two the
      // forward kept (buckets 0 and 1, which the backward reads first):
      // between stage 2's traffic and ZeRO-3's 1.5x of it.
      REQUIRE(m.measured == m.rs + m.ag + m.ag_backward);
      REQUIRE(m.measured > m.rs + m.ag);
      REQUIRE(m.measured <= m.rs + 2 * m.ag);
    }
  }
}

TEST_CASE("stage 3: full_parameters for evaluation and checkpoints, unshard, errors",
          "[train][zero][zero3][errors]") {
  struct result {
    std::vector<std::string> errors;
    std::vector<bool> facts;  // checked outside the ranks (Catch2 is not thread-safe)
  };
  const auto res = per_rank<result>(2, [](communicator& c) {
    result r;
    std::vector<std::string>& out = r.errors;
    std::vector<bool>& facts = r.facts;
    const auto expect = [&](auto&& f) {
      try {
        f();
        out.push_back("(no error)");
      } catch (const error& e) {
        out.push_back(e.what());
      }
    };
    ad::mlp model({4, 5, 2}, ad::activation::relu, 1);
    const std::vector<float> x(8, 0.5f);
    const auto forward = [&] { return ad::sum(model(ad::tensor::from_data(x.data(), {2, 4}))); };
    {
      train::sharded_data_parallel sdp(c, model.parameters(), {.stage = 3});
      ad::adamw opt(sdp.shard());
      sdp.backward(forward());
      sdp.step(opt);
      {
        auto full = sdp.full_parameters();
        // Whole on this rank alone: a forward here is local.
        facts.push_back(model.parameters().all_values().size() == model.parameters().numel());
        if (c.rank() == 0) (void)forward();
        expect([&] { sdp.backward(forward()); });
        expect([&] { sdp.step(opt); });
        expect([&] { auto again = sdp.full_parameters(); });
        // A value written here (a checkpoint load) becomes the shard's.
        for (float& v : model.parameters().all_values()) v = 0.25f;
      }
      const auto shard = sdp.shard().all_values();
      facts.push_back(std::all_of(shard.begin(), shard.end(), [](float v) { return v == 0.25f; }));
    }
    // The trainer is gone without unshard(): reading the model says so.
    expect([&] { (void)forward(); });
    {
      ad::mlp kept({4, 5, 2}, ad::activation::relu, 1);
      train::sharded_data_parallel sdp(c, kept.parameters(), {.stage = 3});
      ad::adamw opt(sdp.shard());
      sdp.unshard();
      expect([&] { sdp.backward(ad::sum(kept(ad::tensor::from_data(x.data(), {2, 4})))); });
      // Whole and usable after the trainer.
      facts.push_back(!kept.parameters().values_released());
    }
    {
      // A scope that outlives its trainer leaves the values whole.
      ad::mlp outlived({4, 5, 2}, ad::activation::relu, 1);
      std::optional<train::full_parameters_scope> full;
      {
        train::sharded_data_parallel sdp(c, outlived.parameters(), {.stage = 3});
        full.emplace(sdp.full_parameters());
      }
      facts.push_back(!outlived.parameters().values_released());
      (void)ad::sum(outlived(ad::tensor::from_data(x.data(), {2, 4})));
    }
    return r;
  });
  for (int r = 0; r < 2; ++r) {
    const auto& m = res[static_cast<std::size_t>(r)];
    REQUIRE(m.facts.size() == 4);
    for (std::size_t i = 0; i < m.facts.size(); ++i) {
      INFO("rank " << r << " fact " << i);
      REQUIRE(m.facts[i]);
    }
    const auto& e = m.errors;
    REQUIRE(e.size() == 5);
    const std::vector<std::string> want = {"full_parameters", "full_parameters", "full_parameters",
                                           "unshard()", "unshard()"};
    for (std::size_t i = 0; i < e.size(); ++i) {
      INFO(e[i]);
      REQUIRE(e[i].find(want[i]) != std::string::npos);
      REQUIRE(e[i].find("rank " + std::to_string(r)) != std::string::npos);
    }
  }
}
