// Checkpoints of compressed data_parallel runs: residuals, counters and warm starts saved per
// rank, so resuming equals the uninterrupted run bit for bit; mismatches are refused.
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include "ringflow/ad/autodiff.hpp"
#include "ringflow/backends/local.hpp"
#include "ringflow/train/checkpoint.hpp"
#include "ringflow/train/data_parallel.hpp"
#include "support/catch.hpp"
#include "support/noise.hpp"

using namespace ringflow;
namespace fs = std::filesystem;

namespace {

using ringflow::testing::noise;

constexpr std::size_t features = 16;
constexpr std::size_t local_batch = 8;
const std::vector<ad::index> sizes = {features, 32, 24, 4};

ad::tensor loss_of(ad::mlp& model, int rank, int step) {
  const auto seed = static_cast<std::uint64_t>(1000 * step + rank + 1);
  const auto x = noise(local_batch * features, seed);
  std::vector<int> y(local_batch);
  for (std::size_t i = 0; i < local_batch; ++i) y[i] = static_cast<int>((i * 5 + seed) % 4);
  const ad::matrix<float> m = Eigen::Map<const ad::matrix<float>>(
      x.data(), static_cast<ad::index>(local_batch), static_cast<ad::index>(features));
  return ad::softmax_cross_entropy(model(ad::tensor::from_matrix(m)), std::span<const int>(y));
}

fs::path temp_dir(const std::string& tag) {
  auto d = fs::temp_directory_path() /
           ("ringflow_ckpt_compress_" + tag + "_" + std::to_string(::getpid()));
  fs::remove_all(d);
  fs::create_directories(d);
  return d;
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

train::data_parallel_options options(const std::string& spec, std::optional<bool> ef,
                                     std::size_t cap = 1024) {
  // auto's uncompressed buckets run allreduce(avg) with these options: the
  // ring, since algo::automatic tunes its choice on a fresh communicator's
  // first calls (a resumed run's first steps could sum in another order).
  return {.bucket_cap_bytes = cap,
          .first_bucket_cap_bytes = 256,
          .coll = {algo::ring, 0},
          .compress = spec,
          .compress_options = {.seed = 3, .error_feedback = ef}};
}

bool has_residual(const std::vector<compress::bucket_state>& st) {
  for (const auto& b : st) {
    if (!b.residual.empty()) return true;
  }
  return false;
}

constexpr int before_save = 4;
constexpr int after_save = 4;

struct rank_result {
  std::vector<std::vector<float>> uninterrupted;  // parameters after each step past the save
  std::vector<std::vector<float>> resumed;
  std::vector<std::vector<float>> resumed_without;  // compression state not restored
  std::vector<compress::bucket_state> saved, loaded;
  int compression_ranks = 0;
};

// Steps [from, to): AdamW with a changing learning rate.
void train_steps(ad::mlp& model, train::data_parallel& dp, ad::adamw& opt, int rank, int from,
                 int to, std::vector<std::vector<float>>* after) {
  for (int t = from; t < to; ++t) {
    opt.set_lr(1e-2 / (1 + 0.2 * t));
    opt.zero_grad();
    dp.backward(loss_of(model, rank, t));
    dp.step(opt);
    if (after != nullptr) {
      const auto v = model.parameters().all_values();
      after->emplace_back(v.begin(), v.end());
    }
  }
}

rank_result run(communicator& c, const fs::path& file, const std::string& spec,
                std::optional<bool> ef) {
  rank_result out;
  {
    ad::mlp model(sizes, ad::activation::tanh, 7);
    train::data_parallel dp(c, model.parameters(), options(spec, ef));
    ad::adamw opt(model.parameters(), {.lr = 1e-2});
    train_steps(model, dp, opt, c.rank(), 0, before_save, nullptr);
    train::training_state st{.params = model.parameters(),
                             .optimizer = train::optimizer_state_of(opt),
                             .step = before_save,
                             .world_size = c.size(),
                             .compression = dp.bucket_compression()};
    train::save_checkpoint(c, file, st);
    out.saved = dp.bucket_compression()->state();
    train_steps(model, dp, opt, c.rank(), before_save, before_save + after_save,
                &out.uninterrupted);
  }
  for (const bool restore : {true, false}) {
    // Fresh objects (as a new process): other weights, fresh compressors.
    ad::mlp model(sizes, ad::activation::tanh, 99);
    train::data_parallel dp(c, model.parameters(), options(spec, ef));
    ad::adamw opt(model.parameters(), {.lr = 1e-2});
    train::training_state st{.params = model.parameters(),
                             .optimizer = train::optimizer_state_of(opt),
                             .compression = restore ? dp.bucket_compression() : nullptr};
    const auto info = train::load_checkpoint(c, file, st);
    if (restore) {
      out.compression_ranks = info.compression_ranks;
      out.loaded = dp.bucket_compression()->state();
    }
    train_steps(model, dp, opt, c.rank(), static_cast<int>(st.step), before_save + after_save,
                restore ? &out.resumed : &out.resumed_without);
  }
  return out;
}

}  // namespace

TEST_CASE("compressed runs resume bit for bit with residuals, counters and warm starts",
          "[train][checkpoint][compress]") {
  const fs::path dir = temp_dir("resume");
  struct config {
    std::string spec;
    std::optional<bool> ef;
    bool stateful;  // restoring nothing must then change the run
  };
  const std::vector<config> configs = {
      {"powersgd:2", {}, true}, {"int8", {}, true},  {"int8", true, true}, {"sign", {}, true},
      {"topk:0.2", {}, true},   {"bf16", {}, false}, {"auto", {}, false}};
  for (const int p : {2, 3}) {
    for (const auto& cfg : configs) {
      INFO("ranks " << p << " compress " << cfg.spec << " error feedback "
                    << (cfg.ef ? (*cfg.ef ? "on" : "off") : "default"));
      const fs::path file = dir / "ck.rfck";
      std::vector<rank_result> res(static_cast<std::size_t>(p));
      local::run(p, [&](communicator& c) {
        res[static_cast<std::size_t>(c.rank())] = run(c, file, cfg.spec, cfg.ef);
      });
      for (int r = 0; r < p; ++r) {
        const auto& m = res[static_cast<std::size_t>(r)];
        INFO("rank " << r);
        REQUIRE(m.compression_ranks == p);
        REQUIRE(!m.saved.empty());
        REQUIRE(m.loaded == m.saved);
        REQUIRE(m.uninterrupted.size() == static_cast<std::size_t>(after_save));
        REQUIRE(m.resumed.size() == m.uninterrupted.size());
        for (std::size_t t = 0; t < m.uninterrupted.size(); ++t) {
          INFO("step " << before_save + t);
          REQUIRE(same_bits(m.resumed[t], m.uninterrupted[t]));
          REQUIRE(same_bits(m.resumed[t], res[0].resumed[t]));
        }
        if (cfg.stateful) {
          // Without the compression state the same checkpoint continues differently:
          // what this test restores matters.
          REQUIRE(!same_bits(m.resumed_without.back(), m.uninterrupted.back()));
        }
      }
      if (cfg.spec == "bf16") {
        // Stateless: the checkpoint alone resumes it exactly.
        REQUIRE(same_bits(res[0].resumed_without.back(), res[0].uninterrupted.back()));
      }
      // Error feedback keeps a residual per rank, and they differ.
      if (has_residual(res[0].saved)) REQUIRE(res[0].saved != res[1].saved);
    }
  }
  fs::remove_all(dir);
}

TEST_CASE("compression state that does not fit is refused, naming the file, rank and problem",
          "[train][checkpoint][compress][errors]") {
  const fs::path dir = temp_dir("refuse");
  const fs::path with = dir / "with.rfck";
  const fs::path without = dir / "without.rfck";
  local::run(2, [&](communicator& c) {
    ad::mlp model(sizes, ad::activation::tanh, 7);
    train::data_parallel dp(c, model.parameters(), options("sign", {}));
    ad::adamw opt(model.parameters(), {.lr = 1e-2});
    train_steps(model, dp, opt, c.rank(), 0, 2, nullptr);
    train::training_state st{.params = model.parameters(),
                             .optimizer = train::optimizer_state_of(opt),
                             .compression = dp.bucket_compression()};
    train::save_checkpoint(c, with, st);
    st.compression = nullptr;
    train::save_checkpoint(c, without, st);
  });
  const auto attempt = [&](int p, const fs::path& file, const std::string& spec, std::size_t cap,
                           bool pass_compression) {
    std::vector<std::string> errs(static_cast<std::size_t>(p));
    local::run(p, [&](communicator& c) {
      ad::mlp model(sizes, ad::activation::tanh, 7);
      train::data_parallel dp(c, model.parameters(), options(spec, {}, cap));
      ad::adamw opt(model.parameters(), {.lr = 1e-2});
      train::training_state st{.params = model.parameters(),
                               .optimizer = train::optimizer_state_of(opt),
                               .compression = pass_compression ? dp.bucket_compression() : nullptr};
      auto& e = errs[static_cast<std::size_t>(c.rank())];
      try {
        train::load_checkpoint(c, file, st);
        e = "(no error)";
      } catch (const train::checkpoint_error& x) {
        e = x.what();
      }
      // Refused: nothing restored, the compression untouched.
      if (e != "(no error)" && (opt.steps() != 0 || !dp.bucket_compression()->state().empty())) {
        e += " [but the state changed]";
      }
    });
    return errs;
  };
  const auto expect = [&](const std::vector<std::string>& errs, const fs::path& file,
                          const std::string& needle) {
    for (const auto& e : errs) {
      INFO(e);
      REQUIRE(e.find(needle) != std::string::npos);
      REQUIRE(e.find(file.string()) != std::string::npos);
      REQUIRE(e.find("rank ") != std::string::npos);
      REQUIRE(e.find("[but the state changed]") == std::string::npos);
    }
  };
  expect(attempt(2, with, "int8", 1024, true), with,
         "holds the state of compression 'sign' but the trainer compresses with 'int8'");
  expect(attempt(3, with, "sign", 1024, true), with, "compression state of 2 rank(s)");
  expect(attempt(2, with, "sign", 256, true), with, "does not fit the trainer");
  expect(attempt(2, without, "sign", 1024, true), without, "holds no compression state");
  // Not asked for: the file's compression state is ignored (at any rank count).
  for (const auto& e : attempt(3, with, "sign", 1024, false)) REQUIRE(e == "(no error)");
  fs::remove_all(dir);
}
