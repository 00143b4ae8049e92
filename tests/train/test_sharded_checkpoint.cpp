// Checkpoints of sharded_data_parallel (ZeRO 1/2) that reshard: written at 4 thread-ranks,
// resumed at 2, 3 and 4 with the same parameters and optimizer state bit for bit.
#include <unistd.h>

#include <cstring>
#include <filesystem>
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
namespace fs = std::filesystem;

namespace {

using ringflow::testing::noise;

const std::vector<ad::index> sizes = {10, 24, 17, 4};  // odd sizes: uneven pieces
constexpr std::size_t features = 10;
constexpr std::size_t global_batch = 12;  // split evenly over 2, 3 or 4 ranks
constexpr int before_save = 3;
constexpr int after_save = 3;
constexpr std::size_t cap = 512;

// Rank `rank` of `p`'s share of step t's global batch: the same samples
// whatever the rank count.
ad::tensor loss_of(ad::mlp& model, int rank, int p, int t) {
  const std::size_t n = global_batch / static_cast<std::size_t>(p);
  const auto all = noise(global_batch * features, 77 + static_cast<std::uint64_t>(t));
  const std::size_t first = n * static_cast<std::size_t>(rank);
  // Row-major: rows [first, first + n) of the global batch.
  const ad::matrix<float> m = Eigen::Map<const ad::matrix<float>>(
      all.data() + first * features, static_cast<ad::index>(n), static_cast<ad::index>(features));
  std::vector<int> y;
  for (std::size_t i = first; i < first + n; ++i) y.push_back(static_cast<int>((i * 7 + t) % 4));
  return ad::softmax_cross_entropy(model(ad::tensor::from_matrix(m)), std::span<const int>(y));
}

double lr_at(int t) { return 1e-2 / (1 + 0.25 * t); }

std::vector<float> copy_of(std::span<const float> s) { return {s.begin(), s.end()}; }

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

fs::path temp_dir(const std::string& tag) {
  auto d = fs::temp_directory_path() /
           ("ringflow_ckpt_sharded_" + tag + "_" + std::to_string(::getpid()));
  fs::remove_all(d);
  fs::create_directories(d);
  return d;
}

// A file's parameters and AdamW state, read by one process into a replicated optimizer.
struct full_state {
  std::vector<float> params, m, v;
  std::int64_t steps = 0, step = 0;
};
full_state read_full(const fs::path& file) {
  ad::mlp model(sizes, ad::activation::tanh, 1);
  ad::adamw opt(model.parameters());
  train::training_state st{.params = model.parameters(),
                           .optimizer = train::optimizer_state_of(opt)};
  train::load_checkpoint(file, st);
  return {copy_of(model.parameters().all_values()), copy_of(opt.first_moment()),
          copy_of(opt.second_moment()), opt.steps(), st.step};
}

// This rank's pieces of a buffer in the parameters' layout.
std::vector<float> pieces_of(const std::vector<float>& full, const std::vector<chunk>& owned) {
  std::vector<float> out;
  for (const chunk& o : owned) {
    out.insert(out.end(), full.begin() + static_cast<std::ptrdiff_t>(o.offset),
               full.begin() + static_cast<std::ptrdiff_t>(o.offset + o.count));
  }
  return out;
}

template <class Trainer>
void train_steps(Trainer& trainer, ad::mlp& model, ad::adamw& opt, const communicator& c, int from,
                 int to, std::vector<std::vector<float>>* after) {
  for (int t = from; t < to; ++t) {
    opt.set_lr(lr_at(t));
    opt.zero_grad();
    trainer.backward(loss_of(model, c.rank(), c.size(), t));
    trainer.step(opt);
    if (after != nullptr) {
      // Stage 3: whole only inside full_parameters() (collective).
      if constexpr (requires { trainer.full_parameters(); }) {
        const auto full = trainer.full_parameters();
        after->push_back(copy_of(model.parameters().all_values()));
      } else {
        after->push_back(copy_of(model.parameters().all_values()));
      }
    }
  }
}

struct rank_result {
  std::vector<std::vector<float>> after;  // parameters after each step past the save
  bool state_matches_file = false;        // this rank's optimizer pieces equal the file's
  std::int64_t steps = 0;
};

}  // namespace

TEST_CASE("sharded checkpoints written at 4 ranks resume at 2, 3 and 4 bit for bit",
          "[train][zero][checkpoint]") {
  const fs::path dir = temp_dir("reshard");
  // Stage 3 saves and loads inside full_parameters() (an empty scope below it).
  for (int stage : {1, 2, 3}) {
    INFO("stage " << stage);
    const fs::path file = dir / "ck.rfck";
    // Written at 4 ranks after 3 steps; the writers go on 3 more steps.
    std::vector<rank_result> writers(4);
    local::run(4, [&](communicator& c) {
      auto& out = writers[static_cast<std::size_t>(c.rank())];
      ad::mlp model(sizes, ad::activation::tanh, 3);
      train::sharded_data_parallel sdp(
          c, model.parameters(),
          {.stage = stage, .bucket_cap_bytes = cap, .first_bucket_cap_bytes = cap / 2});
      ad::adamw opt(sdp.shard(), {.lr = 1e-2, .weight_decay = 0.05});
      train_steps(sdp, model, opt, c, 0, before_save, nullptr);
      train::training_state st{.params = model.parameters(),
                               .optimizer = train::optimizer_state_of(opt, sdp.owned()),
                               .step = before_save,
                               .world_size = c.size()};
      {
        const auto full = sdp.full_parameters();
        train::save_checkpoint(c, file, st);
        // The file holds every rank's pieces at their places.
        const full_state f = read_full(file);
        out.state_matches_file =
            same_bits(pieces_of(f.m, sdp.owned()), copy_of(opt.first_moment())) &&
            same_bits(pieces_of(f.v, sdp.owned()), copy_of(opt.second_moment())) &&
            same_bits(f.params, copy_of(model.parameters().all_values())) &&
            f.steps == before_save && f.step == before_save;
      }
      train_steps(sdp, model, opt, c, before_save, before_save + after_save, &out.after);
      st.step = before_save + after_save;
      const auto full = sdp.full_parameters();
      train::save_checkpoint(c, dir / "writers_end.rfck", st);
    });
    for (const auto& w : writers) REQUIRE(w.state_matches_file);
    const full_state saved = read_full(file);

    for (int p : {2, 3, 4}) {
      INFO("resumed at " << p << " ranks");
      const fs::path again_sharded = dir / "again_sharded.rfck";
      const fs::path again_plain = dir / "again_plain.rfck";
      std::vector<rank_result> sharded(static_cast<std::size_t>(p)), plain(sharded.size());
      std::vector<int> resharded_ok(sharded.size(), 0);
      local::run(p, [&](communicator& c) {
        const auto r = static_cast<std::size_t>(c.rank());
        {
          // Fresh objects with other weights, as a new job at p ranks.
          ad::mlp model(sizes, ad::activation::tanh, 50 + static_cast<unsigned>(c.rank()));
          train::sharded_data_parallel sdp(
              c, model.parameters(),
              {.stage = stage, .bucket_cap_bytes = cap, .first_bucket_cap_bytes = cap / 2});
          ad::adamw opt(sdp.shard(), {.lr = 1e-2, .weight_decay = 0.05});
          train::training_state st{.params = model.parameters(),
                                   .optimizer = train::optimizer_state_of(opt, sdp.owned())};
          {
            // Stage 3: loaded into the whole parameters; the scope's end
            // hands this rank's pieces to the shard.
            const auto full = sdp.full_parameters();
            const auto info = train::load_checkpoint(c, file, st);
            // Same parameters; the optimizer state cut into this rank count's pieces.
            resharded_ok[r] =
                info.world_size == 4 && st.step == before_save && opt.steps() == before_save &&
                same_bits(copy_of(model.parameters().all_values()), saved.params) &&
                same_bits(copy_of(opt.first_moment()), pieces_of(saved.m, sdp.owned())) &&
                same_bits(copy_of(opt.second_moment()), pieces_of(saved.v, sdp.owned()));
          }
          train_steps(sdp, model, opt, c, before_save, before_save + after_save, &sharded[r].after);
          st.step = before_save + after_save;
          const auto full = sdp.full_parameters();
          train::save_checkpoint(c, again_sharded, st);
        }
        {
          // The reference at p ranks: data_parallel over the ring from the same file.
          ad::mlp model(sizes, ad::activation::tanh, 9);
          train::data_parallel dp(c, model.parameters(),
                                  {.bucket_cap_bytes = cap,
                                   .first_bucket_cap_bytes = cap / 2,
                                   .coll = {algo::ring, 0}});
          ad::adamw opt(model.parameters(), {.lr = 1e-2, .weight_decay = 0.05});
          train::training_state st{.params = model.parameters(),
                                   .optimizer = train::optimizer_state_of(opt)};
          train::load_checkpoint(c, file, st);
          train_steps(dp, model, opt, c, before_save, before_save + after_save, &plain[r].after);
          st.step = before_save + after_save;
          train::save_checkpoint(c, again_plain, st);
        }
      });
      for (int r = 0; r < p; ++r) {
        INFO("rank " << r);
        REQUIRE(resharded_ok[static_cast<std::size_t>(r)] == 1);
        const auto& mine = sharded[static_cast<std::size_t>(r)].after;
        REQUIRE(mine.size() == static_cast<std::size_t>(after_save));
        for (std::size_t t = 0; t < mine.size(); ++t) {
          INFO("step " << before_save + t);
          REQUIRE(same_bits(mine[t], plain[static_cast<std::size_t>(r)].after[t]));
          // At the writers' rank count: the uninterrupted run itself.
          if (p == 4) REQUIRE(same_bits(mine[t], writers[static_cast<std::size_t>(r)].after[t]));
        }
      }
      // Continued training leaves the same optimizer state as the reference.
      const full_state a = read_full(again_sharded), b = read_full(again_plain);
      REQUIRE(same_bits(a.params, b.params));
      REQUIRE(same_bits(a.m, b.m));
      REQUIRE(same_bits(a.v, b.v));
      REQUIRE(a.steps == before_save + after_save);
      REQUIRE(!same_bits(a.m, saved.m));
      if (p == 4) {
        // And at the writers' count, the uninterrupted run's optimizer state.
        const full_state w = read_full(dir / "writers_end.rfck");
        REQUIRE(same_bits(a.params, w.params));
        REQUIRE(same_bits(a.m, w.m));
        REQUIRE(same_bits(a.v, w.v));
      }
    }
  }
  fs::remove_all(dir);
}

TEST_CASE("sharded checkpoints: a plain checkpoint resumes sharded, and bad uses are refused",
          "[train][zero][checkpoint][errors]") {
  const fs::path dir = temp_dir("refuse");
  const fs::path file = dir / "ck.rfck";
  std::vector<std::string> errs(3);
  local::run(3, [&](communicator& c) {
    auto& e = errs[static_cast<std::size_t>(c.rank())];
    const auto expect = [&](auto&& f) {
      try {
        f();
        e += "(no error)|";
      } catch (const error& x) {
        e += std::string(x.what()) + "|";
      }
    };
    // Written by data_parallel at 3 ranks, resumed sharded: the same layout.
    ad::mlp model(sizes, ad::activation::tanh, 3);
    {
      train::data_parallel dp(c, model.parameters(), {.coll = {algo::ring, 0}});
      ad::adamw opt(model.parameters());
      train_steps(dp, model, opt, c, 0, 2, nullptr);
      train::training_state st{.params = model.parameters(),
                               .optimizer = train::optimizer_state_of(opt)};
      train::save_checkpoint(c, file, st);
    }
    train::sharded_data_parallel sdp(c, model.parameters(), {.stage = 2});
    ad::adamw opt(sdp.shard());
    train::training_state st{.params = model.parameters(),
                             .optimizer = train::optimizer_state_of(opt, sdp.owned())};
    expect([&] { train::load_checkpoint(c, file, st); });
    if (opt.steps() != 2) e += "[steps not restored]|";
    // One rank forgets the pieces: every rank refuses, naming it.
    train::training_state wrong = st;
    if (c.rank() == 1) wrong.optimizer = train::optimizer_state_of(opt);
    expect([&] { train::save_checkpoint(c, dir / "never.rfck", wrong); });
    // One process cannot write the other ranks' pieces.
    expect([&] { train::save_checkpoint(dir / ("one" + std::to_string(c.rank()) + ".rfck"), st); });
    // Pieces of another trainer (here: shifted past the parameters).
    train::training_state shifted = st;
    for (auto& piece : shifted.optimizer.pieces) piece.offset += model.parameters().numel();
    expect([&] { train::load_checkpoint(c, file, shifted); });
    // A model of another layout, sharded the same way.
    ad::mlp wide({10, 25, 17, 4}, ad::activation::tanh, 3);
    train::sharded_data_parallel wide_sdp(c, wide.parameters(), {.stage = 1});
    ad::adamw wide_opt(wide_sdp.shard());
    train::training_state wide_st{
        .params = wide.parameters(),
        .optimizer = train::optimizer_state_of(wide_opt, wide_sdp.owned())};
    expect([&] { train::load_checkpoint(c, file, wide_st); });
    if (wide_opt.steps() != 0) e += "[refused but changed]|";
  });
  for (int r = 0; r < 3; ++r) {
    const std::string& e = errs[static_cast<std::size_t>(r)];
    INFO(e);
    std::vector<std::string> parts;
    std::size_t at = 0;
    for (std::size_t bar; (bar = e.find('|', at)) != std::string::npos; at = bar + 1) {
      parts.push_back(e.substr(at, bar - at));
    }
    REQUIRE(parts.size() == 5);
    REQUIRE(parts[0] == "(no error)");
    REQUIRE(parts[1].find("rank 1: ") != std::string::npos);
    REQUIRE(parts[1].find("optimizer_state_of(opt, sdp.owned())") != std::string::npos);
    REQUIRE(parts[2].find("cannot be written by one process") != std::string::npos);
    REQUIRE(parts[2].find("one" + std::to_string(r) + ".rfck") != std::string::npos);
    REQUIRE(parts[3].find("reaches past") != std::string::npos);
    REQUIRE(parts[3].find("rank ") != std::string::npos);
    REQUIRE(parts[3].find(file.string()) != std::string::npos);
    REQUIRE(parts[4].find("does not match the model") != std::string::npos);
    REQUIRE(parts[4].find("rank 0: checkpoint '" + file.string()) != std::string::npos);
  }
  REQUIRE(!fs::exists(dir / "never.rfck"));
  fs::remove_all(dir);
}
