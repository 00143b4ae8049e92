// Checkpoints: round trip, corruption, truncation, mismatch, atomic replacement, exact resume on 2
// thread-ranks.
#include <sys/resource.h>
#include <unistd.h>
#include <zlib.h>

#include <csignal>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "ringflow/ad/autodiff.hpp"
#include "ringflow/backends/local.hpp"
#include "ringflow/coll/collectives.hpp"
#include "ringflow/data/batch.hpp"
#include "ringflow/data/sampler.hpp"
#include "ringflow/train/checkpoint.hpp"
#include "ringflow/train/data_parallel.hpp"
#include "support/catch.hpp"

using namespace ringflow;
namespace fs = std::filesystem;

namespace {

fs::path temp_dir(const std::string& tag) {
  auto d = fs::temp_directory_path() / ("ringflow_ckpt_" + tag + "_" + std::to_string(::getpid()));
  fs::remove_all(d);
  fs::create_directories(d);
  return d;
}

std::vector<unsigned char> read_all(const fs::path& f) {
  std::ifstream in(f, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}
void write_all(const fs::path& f, const std::vector<unsigned char>& b) {
  std::ofstream out(f, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
}

std::vector<float> copy(std::span<const float> s) { return {s.begin(), s.end()}; }

// A synthetic 4-class dataset: class = a region of the 16 features.
data::dataset toy_dataset(std::size_t n) {
  data::dataset ds;
  ds.images.resize(static_cast<Eigen::Index>(n), 16);
  ds.rows = 4;
  ds.cols = 4;
  ds.num_classes = 4;
  std::uint64_t x = 12345;
  for (std::size_t i = 0; i < n; ++i) {
    const int label = static_cast<int>(i % 4);
    ds.labels.push_back(label);
    for (int f = 0; f < 16; ++f) {
      x = x * 6364136223846793005ull + 1442695040888963407ull;
      const float r = static_cast<float>(x >> 40) / static_cast<float>(1 << 24);
      ds.images(static_cast<Eigen::Index>(i), f) = r + (f / 4 == label ? 1.0f : 0.0f);
    }
  }
  return ds;
}

// Everything one rank trains with, built fresh (as a new process would).
struct trainer_setup {
  ad::mlp model;
  ad::adamw opt;
  data::sampler sampler;
  train::training_state state;
  trainer_setup(int rank, int world, std::uint64_t model_seed, std::size_t n)
      : model({16, 12, 4}, ad::activation::relu, model_seed), opt(model.parameters(), {.lr = 5e-2}),
        sampler(n, rank, world, 7) {
    state.params = model.parameters();
    state.optimizer = train::optimizer_state_of(opt);
    state.sampler = &sampler;
    state.world_size = world;
  }
};

// `steps` data-parallel steps; returns this rank's losses. Epochs roll over
// inside; the learning rate follows a schedule of the global step.
std::vector<float> run_steps(trainer_setup& t, train::data_parallel& dp, const data::dataset& ds,
                             std::size_t batch, int steps) {
  const auto sched = ad::cosine_lr(5e-2, 40);
  std::vector<float> losses;
  data::batch b;
  for (int i = 0; i < steps; ++i) {
    if (t.sampler.position() + batch > t.sampler.per_rank()) {
      t.sampler.set_epoch(t.sampler.epoch() + 1);
    }
    data::assemble_batch(ds, t.sampler.remaining().first(batch), b);
    t.opt.set_lr(sched(t.state.step));
    t.opt.zero_grad();
    auto x = ad::tensor::from_data(b.images.data(), {static_cast<ad::index>(b.size()), 16});
    auto loss = ad::softmax_cross_entropy(t.model(x), std::span<const int>(b.labels));
    dp.backward(loss);
    dp.step(t.opt);
    t.sampler.advance(batch);
    ++t.state.step;
    losses.push_back(loss.item());
  }
  return losses;
}

}  // namespace

TEST_CASE("checkpoint round trip restores parameters, optimizer, sampler, step, extra",
          "[train][checkpoint]") {
  const fs::path dir = temp_dir("roundtrip");
  const auto ds = toy_dataset(64);
  trainer_setup a(0, 1, 1, ds.size());
  local::run(1, [&](communicator& c) {
    train::data_parallel dp(c, a.model.parameters());
    run_steps(a, dp, ds, 8, 11);
  });
  a.state.extra["global_batch"] = "8";
  train::save_checkpoint(dir / "ck.bin", a.state);

  trainer_setup b(0, 1, 99, ds.size());
  REQUIRE(copy(b.model.parameters().all_values()) != copy(a.model.parameters().all_values()));
  const auto info = train::load_checkpoint(dir / "ck.bin", b.state);
  REQUIRE(info.format_version == train::checkpoint_format_version);
  REQUIRE(info.world_size == 1);
  REQUIRE(copy(b.model.parameters().all_values()) == copy(a.model.parameters().all_values()));
  REQUIRE(copy(b.opt.first_moment()) == copy(a.opt.first_moment()));
  REQUIRE(copy(b.opt.second_moment()) == copy(a.opt.second_moment()));
  REQUIRE(b.opt.steps() == a.opt.steps());
  REQUIRE(b.sampler.state() == a.sampler.state());
  REQUIRE(b.state.step == 11);
  REQUIRE(b.state.extra.at("global_batch") == "8");

  // SGD with momentum and no sampler.
  ad::mlp m1({5, 3}, ad::activation::none, 1), m2({5, 3}, ad::activation::none, 2);
  ad::sgd s1(m1.parameters(), {.lr = 0.1, .momentum = 0.9}),
      s2(m2.parameters(), {.lr = 0.1, .momentum = 0.9});
  s1.velocity()[3] = 1.5f;
  s1.set_steps(4);
  train::save_checkpoint(dir / "sgd.bin",
                         {.params = m1.parameters(), .optimizer = train::optimizer_state_of(s1)});
  train::training_state st{.params = m2.parameters(), .optimizer = train::optimizer_state_of(s2)};
  train::load_checkpoint(dir / "sgd.bin", st);
  REQUIRE(s2.velocity()[3] == 1.5f);
  REQUIRE(s2.steps() == 4);
  REQUIRE(copy(m2.parameters().all_values()) == copy(m1.parameters().all_values()));
  fs::remove_all(dir);
}

TEST_CASE("corrupt, truncated, mismatched and future checkpoints are refused untouched",
          "[train][checkpoint]") {
  const fs::path dir = temp_dir("bad");
  const fs::path file = dir / "ck.bin";
  ad::mlp model({6, 5, 3}, ad::activation::relu, 1);
  ad::adamw opt(model.parameters());
  opt.first_moment()[0] = 0.25f;
  train::save_checkpoint(
      file, {.params = model.parameters(), .optimizer = train::optimizer_state_of(opt)});
  const auto good = read_all(file);

  ad::mlp other({6, 5, 3}, ad::activation::relu, 2);
  ad::adamw other_opt(other.parameters());
  const auto before = copy(other.parameters().all_values());
  train::training_state target{.params = other.parameters(),
                               .optimizer = train::optimizer_state_of(other_opt)};
  const auto expect_refused = [&](const std::string& needle) {
    try {
      train::load_checkpoint(file, target);
      FAIL("the checkpoint was accepted; expected: " << needle);
    } catch (const train::checkpoint_error& e) {
      const std::string msg = e.what();
      INFO(msg);
      REQUIRE(msg.find(file.string()) != std::string::npos);
      REQUIRE(msg.find(needle) != std::string::npos);
    }
    REQUIRE(copy(other.parameters().all_values()) == before);
    REQUIRE(other_opt.first_moment()[0] == 0.0f);
    REQUIRE(other_opt.steps() == 0);
  };

  SECTION("a flipped byte in the payload") {
    for (std::size_t at : {std::size_t{40}, good.size() / 2, good.size() - 1}) {
      auto b = good;
      b[at] ^= 0x10;
      write_all(file, b);
      expect_refused("corrupt");
    }
  }
  SECTION("a flipped byte in the header") {
    auto b = good;
    b[20] ^= 0x01;  // payload size field
    write_all(file, b);
    expect_refused("header is corrupt");
  }
  SECTION("truncated") {
    for (std::size_t keep : {std::size_t{0}, std::size_t{10}, std::size_t{32}, good.size() - 4}) {
      write_all(file, std::vector<unsigned char>(good.begin(),
                                                 good.begin() + static_cast<std::ptrdiff_t>(keep)));
      expect_refused("truncated");
    }
  }
  SECTION("not a checkpoint") {
    write_all(file, std::vector<unsigned char>(100, 'x'));
    expect_refused("not a ringflow checkpoint");
  }
  SECTION("missing file") {
    fs::remove(file);
    expect_refused("does not exist");
  }
  SECTION("a newer format version") {
    auto b = good;
    b[8] = 7;  // version 7, header crc recomputed so only the version is wrong
    std::vector<unsigned char> h(b.begin(), b.begin() + 32);
    std::memset(h.data() + 12, 0, 4);
    const std::uint32_t crc = static_cast<std::uint32_t>(crc32(crc32(0L, Z_NULL, 0), h.data(), 32));
    std::memcpy(b.data() + 12, &crc, 4);
    write_all(file, b);
    expect_refused("format version 7");
  }
  SECTION("a model of another shape") {
    ad::mlp wide({6, 7, 3}, ad::activation::relu, 1);
    ad::adamw wide_opt(wide.parameters());
    train::save_checkpoint(
        file, {.params = wide.parameters(), .optimizer = train::optimizer_state_of(wide_opt)});
    expect_refused("'0.weight' [6,7] in the checkpoint but '0.weight' [6,5] in the model");
  }
  SECTION("a model with other parameters") {
    ad::mlp deep({6, 5, 5, 3}, ad::activation::relu, 1);
    train::save_checkpoint(file, {.params = deep.parameters()});
    expect_refused("holds 6 parameters, the model has 4");
  }
  SECTION("another optimizer") {
    ad::sgd sgd(model.parameters(), {.momentum = 0.9});
    train::save_checkpoint(
        file, {.params = model.parameters(), .optimizer = train::optimizer_state_of(sgd)});
    expect_refused("kind 'sgd' but the optimizer is 'adamw'");
  }
  fs::remove_all(dir);
}

TEST_CASE("a failed save leaves the previous checkpoint intact and no temporary behind",
          "[train][checkpoint]") {
  const fs::path dir = temp_dir("atomic");
  const fs::path file = dir / "ck.bin";
  ad::mlp model({64, 64, 10}, ad::activation::relu, 1);
  train::save_checkpoint(file, {.params = model.parameters()});
  const auto old_bytes = read_all(file);
  REQUIRE(old_bytes.size() > 16000);

  // Make the next write fail half-way: a file size limit below the
  // checkpoint's size (the write returns EFBIG once SIGXFSZ is ignored).
  model.parameters().all_values()[0] += 1.0f;
  auto* old_handler = std::signal(SIGXFSZ, SIG_IGN);
  rlimit saved{};
  ::getrlimit(RLIMIT_FSIZE, &saved);
  rlimit small = saved;
  small.rlim_cur = 8000;
  ::setrlimit(RLIMIT_FSIZE, &small);
  std::string msg;
  try {
    train::save_checkpoint(file, {.params = model.parameters()});
  } catch (const train::checkpoint_error& e) {
    msg = e.what();
  }
  ::setrlimit(RLIMIT_FSIZE, &saved);
  std::signal(SIGXFSZ, old_handler);
  INFO(msg);
  REQUIRE(msg.find("writing the temporary file") != std::string::npos);
  REQUIRE(msg.find("untouched") != std::string::npos);
  REQUIRE(read_all(file) == old_bytes);
  std::size_t entries = 0;
  for (const auto& e : fs::directory_iterator(dir)) {
    (void)e;
    ++entries;
  }
  REQUIRE(entries == 1);

  // A folder that does not exist.
  try {
    train::save_checkpoint(dir / "nope" / "ck.bin", {.params = model.parameters()});
    FAIL("saved into a missing folder");
  } catch (const train::checkpoint_error& e) {
    REQUIRE(std::string(e.what()).find("nope/ck.bin") != std::string::npos);
  }
  fs::remove_all(dir);
}

TEST_CASE("resuming from a checkpoint reproduces the uninterrupted loss trajectory bit for bit",
          "[train][checkpoint][resume]") {
  const fs::path dir = temp_dir("resume");
  const fs::path file = dir / "ck.bin";
  const auto ds = toy_dataset(80);  // 2 ranks x 40: 5 steps of 8 per epoch
  const int world = 2, k = 7, m = 9;
  const std::size_t batch = 8;
  std::vector<std::vector<float>> uninterrupted(world), resumed(world);
  std::vector<std::vector<float>> final_a(world), final_b(world);

  local::run(world, [&](communicator& c) {
    const auto r = static_cast<std::size_t>(c.rank());
    trainer_setup t(c.rank(), world, 3, ds.size());
    train::data_parallel dp(c, t.model.parameters());
    run_steps(t, dp, ds, batch, k);
    train::save_checkpoint(c, file, t.state);
    uninterrupted[r] = run_steps(t, dp, ds, batch, m);
    final_a[r] = copy(t.model.parameters().all_values());
  });
  local::run(world, [&](communicator& c) {
    const auto r = static_cast<std::size_t>(c.rank());
    trainer_setup t(c.rank(), world, 1000 + static_cast<unsigned>(c.rank()), ds.size());
    train::load_checkpoint(c, file, t.state);
    train::data_parallel dp(c, t.model.parameters(), {.broadcast_parameters = false});
    resumed[r] = run_steps(t, dp, ds, batch, m);
    final_b[r] = copy(t.model.parameters().all_values());
  });
  for (std::size_t r = 0; r < world; ++r) {
    REQUIRE(uninterrupted[r].size() == static_cast<std::size_t>(m));
    REQUIRE(std::memcmp(uninterrupted[r].data(), resumed[r].data(), m * sizeof(float)) == 0);
    REQUIRE(final_a[r] == final_b[r]);
  }
  // The run really trained (the losses moved).
  REQUIRE(uninterrupted[0].front() != uninterrupted[0].back());

  // A collective load of a corrupt file: every rank throws the same error.
  auto bytes = read_all(file);
  bytes[bytes.size() / 2] ^= 0xff;
  write_all(file, bytes);
  std::vector<std::string> errors(world);
  local::run(world, [&](communicator& c) {
    trainer_setup t(c.rank(), world, 5, ds.size());
    try {
      train::load_checkpoint(c, file, t.state);
    } catch (const train::checkpoint_error& e) {
      errors[static_cast<std::size_t>(c.rank())] = e.what();
    }
  });
  for (const auto& e : errors) {
    INFO(e);
    REQUIRE(e.find("corrupt") != std::string::npos);
    REQUIRE(e == errors[0]);
  }
  fs::remove_all(dir);
}
