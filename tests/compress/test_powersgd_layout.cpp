// PowerSGD with a bucket layout: one matrix per 2-D tensor, 1-D and small
// tensors (and uncovered elements) sent as they are; exact on low-rank
// layers, identical to compressing each layer alone, exact byte counts, error
// feedback, and bad layouts rejected.
#include <cmath>
#include <cstring>
#include <mutex>
#include <vector>

#include "ringflow/ad/autodiff.hpp"
#include "ringflow/backends/local.hpp"
#include "ringflow/compress/bucket_compression.hpp"
#include "ringflow/compress/compressed_allreduce.hpp"
#include "ringflow/compress/compressor.hpp"
#include "ringflow/compress/kernels.hpp"
#include "ringflow/core/error.hpp"
#include "ringflow/train/data_parallel.hpp"
#include "support/catch.hpp"

using namespace ringflow;
using namespace ringflow::compress;

namespace {
// A two-layer MLP's bucket plus a gap and a tiny matrix:
//   W1 40x30 | b1 30 | W2 30x20 | b2 20 | 7 uncovered elements | S 4x3
constexpr std::size_t bucket_n = 1200 + 30 + 600 + 20 + 7 + 12;
bucket_layout mlp_layout() {
  // Deliberately not in offset order.
  return {bucket_n, {{1230, 30, 20}, {0, 40, 30}, {1857, 4, 3}, {1200, 1, 30}, {1830, 1, 20}}};
}

std::vector<float> random_vector(std::size_t n, std::uint64_t seed) {
  std::vector<float> v(n);
  const std::uint64_t key = kernels::stream_key(seed, 3, 4);
  for (std::size_t i = 0; i < n; ++i) v[i] = kernels::uniform01(key, i) * 2.0f - 1.0f;
  return v;
}

// The bucket with W1 of rank 2 and W2 of rank 1 (times `scale`); the rest random.
std::vector<float> low_rank_bucket(std::uint64_t seed, float scale = 1.0f) {
  auto x = random_vector(bucket_n, seed);
  const auto u = random_vector(110, 1), v = random_vector(90, 2);
  for (std::size_t i = 0; i < 40; ++i)
    for (std::size_t j = 0; j < 30; ++j)
      x[i * 30 + j] = scale * (u[i] * v[j] + u[40 + i] * v[40 + j]);
  for (std::size_t i = 0; i < 30; ++i)
    for (std::size_t j = 0; j < 20; ++j) x[1230 + i * 20 + j] = scale * u[80 + i] * v[70 + j];
  return x;
}

std::vector<float> round_trip(compressor& c, const std::vector<float>& x, std::uint64_t bucket) {
  std::vector<std::byte> payload(c.payload_bytes(x.size()));
  c.encode(x, payload, bucket);
  std::vector<float> out(x.size(), 7.0f);
  c.decode(payload, out);
  return out;
}

double rel_error(const std::vector<float>& got, const std::vector<float>& want, std::size_t lo,
                 std::size_t hi) {
  double err = 0, norm = 0;
  for (std::size_t i = lo; i < hi; ++i) {
    err += std::pow(static_cast<double>(got[i]) - want[i], 2);
    norm += std::pow(static_cast<double>(want[i]), 2);
  }
  return std::sqrt(err / norm);
}

bool same_range(const std::vector<float>& a, const std::vector<float>& b, std::size_t lo,
                std::size_t hi) {
  return std::memcmp(a.data() + lo, b.data() + lo, (hi - lo) * sizeof(float)) == 0;
}

template <class F>
void require_usage_error(F f, const std::string& word) {
  try {
    f();
  } catch (const usage_error& e) {
    INFO(e.what());
    REQUIRE(std::string(e.what()).find(word) != std::string::npos);
    return;
  }
  FAIL("expected usage_error mentioning '" << word << "'");
}
}  // namespace

TEST_CASE("PowerSGD plans one matrix per 2-D tensor and sends the rest as it is",
          "[compress][powersgd][layout]") {
  powersgd_compressor c(2, 1);
  c.set_layout(mlp_layout());
  const auto pl = c.plan_of(bucket_n);
  REQUIRE(pl.matrices.size() == 2);  // the 4x3 matrix would grow: (4+3)*2*2 >= 12
  REQUIRE(pl.matrices[0].offset == 0);
  REQUIRE(pl.matrices[0].rows == 40);
  REQUIRE(pl.matrices[0].cols == 30);
  REQUIRE(pl.matrices[1].offset == 1230);
  REQUIRE(pl.matrices[1].rank == 2);
  REQUIRE(pl.raw.size() == 2);  // b1, then b2 + gap + S
  REQUIRE(pl.raw[0].offset == 1200);
  REQUIRE(pl.raw[0].size == 30);
  REQUIRE(pl.raw[1].offset == 1830);
  REQUIRE(pl.raw[1].size == 20 + 7 + 12);
  REQUIRE(pl.p_floats == 2 * (40 + 30));
  REQUIRE(pl.q_floats == 2 * (30 + 20));
  REQUIRE(pl.raw_floats == 69);
  // Bytes and ratio exact: P's + raw in the first allreduce, Q's in the second.
  REQUIRE(c.payload_bytes(bucket_n) == 4 * (140 + 69 + 100));
  const auto w = c.wire_plan(bucket_n, 4);
  REQUIRE(w.size() == 2);
  REQUIRE(w[0].bytes == 4 * (140 + 69));
  REQUIRE(w[1].bytes == 4 * 100);
  // At rank 25 no matrix's factors are under half its size: all sent as it is.
  powersgd_compressor big(25, 1);
  big.set_layout(mlp_layout());
  REQUIRE(big.plan_of(bucket_n).matrices.empty());
  REQUIRE(big.wire_plan(bucket_n, 4).size() == 1);  // nothing to compress: one allreduce
  REQUIRE(big.payload_bytes(bucket_n) == 4 * bucket_n);
  // Without a layout: the old near-square view of the whole bucket.
  powersgd_compressor flat(2, 1);
  REQUIRE(flat.plan_of(bucket_n).matrices.size() == 1);
  REQUIRE(flat.plan_of(bucket_n).matrices[0].rows == flat.shape_of(bucket_n).rows);
  REQUIRE(flat.plan_of(bucket_n).raw.empty());
}

TEST_CASE("PowerSGD with a layout is exact on low-rank layers and leaves the rest untouched",
          "[compress][powersgd][layout]") {
  powersgd_compressor c(2, 9);
  c.set_layout(mlp_layout());
  const auto x = low_rank_bucket(5);
  for (int step = 0; step < 2; ++step) {  // the first step already converges on rank <= 2
    const auto y = round_trip(c, x, 4);
    REQUIRE(rel_error(y, x, 0, 1200) < 1e-5);
    REQUIRE(rel_error(y, x, 1230, 1830) < 1e-5);
    REQUIRE(same_range(y, x, 1200, 1230));      // b1 sent as it is
    REQUIRE(same_range(y, x, 1830, bucket_n));  // b2, gap, small matrix
  }
  // The old whole-bucket view mixes the layers: far from exact on the same data.
  powersgd_compressor flat(2, 9);
  const auto z = round_trip(flat, x, 4);
  REQUIRE(rel_error(z, x, 0, bucket_n) > 0.1);
}

TEST_CASE("PowerSGD per layer equals compressing each layer alone",
          "[compress][powersgd][layout]") {
  const auto x = random_vector(bucket_n, 17);
  powersgd_compressor all(3, 21);
  all.set_layout(mlp_layout());
  powersgd_compressor w1(3, 21), w2(3, 21);
  w1.set_layout({1200, {{0, 40, 30}}});
  w2.set_layout({600, {{0, 30, 20}}});
  for (int step = 0; step < 3; ++step) {  // the warm start too
    const auto y = round_trip(all, x, 6);
    const std::vector<float> x1(x.begin(), x.begin() + 1200),
        x2(x.begin() + 1230, x.begin() + 1830);
    const auto y1 = round_trip(w1, x1, 6), y2 = round_trip(w2, x2, 6);
    REQUIRE(std::memcmp(y.data(), y1.data(), 1200 * sizeof(float)) == 0);
    REQUIRE(std::memcmp(y.data() + 1230, y2.data(), 600 * sizeof(float)) == 0);
  }

  // The collective on 3 ranks: the same up to the ring's summation order.
  const int p = 3;
  std::vector<std::vector<float>> together(p), alone(p);
  local::run(p, [&](communicator& c) {
    auto g = random_vector(bucket_n, 100 + static_cast<std::uint64_t>(c.rank()));
    auto g1 = std::vector<float>(g.begin(), g.begin() + 1200);
    auto g2 = std::vector<float>(g.begin() + 1230, g.begin() + 1830);
    powersgd_compressor a(3, 21), b1(3, 21), b2(3, 21);
    a.set_layout(mlp_layout());
    b1.set_layout({1200, {{0, 40, 30}}});
    b2.set_layout({600, {{0, 30, 20}}});
    for (int step = 0; step < 2; ++step) {
      auto ga = g, ga1 = g1, ga2 = g2;
      compressed_allreduce(c, std::span(ga), a, 2);
      compressed_allreduce(c, std::span(ga1), b1, 2);
      compressed_allreduce(c, std::span(ga2), b2, 2);
      if (step == 1) {
        ga1.insert(ga1.end(), ga.begin() + 1200, ga.begin() + 1230);
        ga1.insert(ga1.end(), ga2.begin(), ga2.end());
        together[static_cast<std::size_t>(c.rank())] =
            std::vector<float>(ga.begin(), ga.begin() + 1830);
        alone[static_cast<std::size_t>(c.rank())] = ga1;
      }
    }
  });
  for (int r = 0; r < p; ++r) {
    REQUIRE(together[static_cast<std::size_t>(r)] == together[0]);  // every rank the same bits
    REQUIRE(rel_error(together[static_cast<std::size_t>(r)], alone[static_cast<std::size_t>(r)], 0,
                      1830) < 1e-5);
  }
}

TEST_CASE("PowerSGD with a layout: low-rank sums are exact and bytes are counted exactly",
          "[compress][powersgd][layout]") {
  for (int p : {1, 2, 4}) {
    INFO(p << " ranks");
    std::vector<traffic> ts(static_cast<std::size_t>(p));
    std::vector<std::vector<float>> outs(static_cast<std::size_t>(p));
    local::run(p, [&](communicator& c) {
      powersgd_compressor comp(2, 3);
      comp.set_layout(mlp_layout());
      // Rank r sends (r + 1) times the same low-rank layers: the sum stays low rank.
      auto g = low_rank_bucket(5, static_cast<float>(c.rank() + 1));
      ts[static_cast<std::size_t>(c.rank())] = compressed_allreduce(c, std::span(g), comp, 0);
      outs[static_cast<std::size_t>(c.rank())] = g;
    });
    // Average of (r + 1) * x over r = (p + 1) / 2 * x on the layers.
    auto want = low_rank_bucket(5, static_cast<float>(p + 1) / 2.0f);
    REQUIRE(rel_error(outs[0], want, 0, 1200) < 1e-5);
    REQUIRE(rel_error(outs[0], want, 1230, 1830) < 1e-5);
    std::size_t sent = 0;
    for (const traffic& t : ts) {
      REQUIRE(t.payload_bytes == 4 * (140 + 69 + 100));
      REQUIRE(t.raw_bytes == 4 * bucket_n);
      REQUIRE(t.ratio() == static_cast<double>(4 * bucket_n) / (4 * (140 + 69 + 100)));
      sent += t.bytes_sent;
    }
    // Two ring allreduces: every rank's bytes add up to 2(p-1) B for each.
    REQUIRE(sent == 2 * static_cast<std::size_t>(p - 1) * (4 * (140 + 69) + 4 * 100));
  }
}

TEST_CASE("PowerSGD with a layout keeps error feedback exact", "[compress][powersgd][layout][ef]") {
  const int steps = 5;
  for (int p : {1, 3}) {
    INFO(p << " ranks");
    std::vector<double> sent(bucket_n, 0.0), inputs(bucket_n, 0.0), resid(bucket_n, 0.0);
    std::mutex m;
    bool bias_held_back = false;
    local::run(p, [&](communicator& c) {
      powersgd_compressor comp(1, 8);
      comp.set_layout(mlp_layout());
      error_feedback fb;
      std::vector<double> my_sent(bucket_n, 0.0), my_in(bucket_n, 0.0);
      for (int s = 0; s < steps; ++s) {
        auto g = random_vector(
            bucket_n, 1000 * static_cast<std::uint64_t>(s) + static_cast<std::uint64_t>(c.rank()));
        for (std::size_t i = 0; i < bucket_n; ++i) my_in[i] += g[i];
        compressed_allreduce(c, std::span(g), comp, 11, &fb);
        if (c.rank() == 0) {
          for (std::size_t i = 0; i < bucket_n; ++i)
            my_sent[i] += static_cast<double>(g[i]) * c.size();
        }
      }
      auto r = fb.residual(11, bucket_n);
      std::lock_guard lock(m);
      for (std::size_t i = 0; i < bucket_n; ++i) {
        sent[i] += my_sent[i];
        inputs[i] += my_in[i];
        resid[i] += r[i];
      }
      for (std::size_t i = 1200; i < 1230; ++i) bias_held_back |= r[i] != 0.0f;
    });
    REQUIRE_FALSE(bias_held_back);  // nothing of the uncompressed elements is held back
    double worst = 0;
    for (std::size_t i = 0; i < bucket_n; ++i)
      worst = std::max(worst, std::abs(sent[i] + resid[i] - inputs[i]));
    REQUIRE(worst < 1e-4 * p);
  }
}

TEST_CASE("bad bucket layouts are rejected with a clear usage_error",
          "[compress][powersgd][layout][errors]") {
  powersgd_compressor c(2);
  require_usage_error([&] { c.set_layout({100, {{0, 5, 10}, {40, 5, 10}}}); }, "overlap");
  require_usage_error([&] { c.set_layout({100, {{60, 5, 10}}}); }, "outside the bucket");
  require_usage_error([&] { c.set_layout({100, {{200, 1, 1}}}); }, "outside the bucket");
  require_usage_error([&] { c.set_layout({100, {{0, 0, 10}}}); }, "empty");
  require_usage_error(
      [&] {
        c.set_layout({100, {{0, std::size_t{1} << 40, std::size_t{1} << 40}}});
      },
      "outside the bucket");
  REQUIRE_FALSE(c.layout());  // a rejected layout leaves the old one
  // Touching tensors are fine; a bucket of another size is not.
  c.set_layout({100, {{0, 5, 10}, {50, 5, 10}}});
  std::vector<float> x(99, 1.0f);
  std::vector<std::byte> payload(4 * 99);
  require_usage_error([&] { c.encode(x, payload); }, "layout describes 100");
  require_usage_error([&] { c.payload_bytes(99); }, "layout describes 100");
  c.clear_layout();
  REQUIRE(c.payload_bytes(99) == 4 * 2 * (10 + 10));  // the flat 10 x 10 view again
  bucket_compression bc("powersgd:2");
  require_usage_error([&] { bc.set_layout(0, {10, {{0, 3, 4}}}); }, "outside the bucket");
}

TEST_CASE("bucket_compression hands each bucket's layout to its compressor",
          "[compress][powersgd][layout]") {
  std::vector<traffic> ts(2);
  local::run(2, [&](communicator& c) {
    bucket_compression bc("powersgd:2", {.seed = 3});
    bc.set_layout(1, mlp_layout());
    auto g = random_vector(bucket_n, 9);
    bc.reduce(c, std::span(g), 1);
    ts[static_cast<std::size_t>(c.rank())] = bc.total();
  });
  REQUIRE(ts[0].payload_bytes == 4 * (140 + 69 + 100));
  // Element-wise compressors take the layout and ignore it.
  bucket_compression b8("int8");
  b8.set_layout(0, mlp_layout());
}

TEST_CASE("train::data_parallel gives PowerSGD the parameter shapes of its buckets",
          "[compress][powersgd][layout][train]") {
  // MLP 40-30-20-4 in one bucket, rank 2: the 40x30 and 30x20 weights are
  // matrices; the 20x4 weight ((20 + 4) * 2 * 2 >= 80) and the biases go raw.
  // Flat, the 1934 elements would be one 44 x 44 matrix: 4 * 2 * 88 = 704 bytes.
  const std::size_t want = 4 * ((40 + 30) * 2 + (30 + 20) * 2 + (30 + 20 + 80 + 4));
  std::vector<traffic> ts(2);
  std::vector<std::vector<float>> values(2);
  local::run(2, [&](communicator& c) {
    ad::mlp model({40, 30, 20, 4}, ad::activation::relu, 7);
    train::data_parallel dp(c, model.parameters(),
                            {.bucket_cap_bytes = 1 << 20,
                             .first_bucket_cap_bytes = 1 << 20,
                             .compress = "powersgd:2",
                             .compress_options = {.seed = 3}});
    ad::adamw opt(model.parameters(), {.lr = 1e-2});
    auto x_data = random_vector(8 * 40, 50 + static_cast<std::uint64_t>(c.rank()));
    const std::vector<int> y{0, 1, 2, 3, 0, 1, 2, 3};
    for (int step = 0; step < 2; ++step) {
      opt.zero_grad();
      auto x = ad::tensor::from_data(x_data.data(), {8, 40});
      dp.backward(ad::softmax_cross_entropy(model(x), std::span<const int>(y)));
      dp.step(opt);
    }
    ts[static_cast<std::size_t>(c.rank())] = dp.compression_traffic();
    const auto v = model.parameters().all_values();
    values[static_cast<std::size_t>(c.rank())].assign(v.begin(), v.end());
  });
  REQUIRE(ts[0].calls == 2);
  REQUIRE(ts[0].elements == 2 * 1934);
  REQUIRE(ts[0].payload_bytes == 2 * want);
  REQUIRE(values[0] == values[1]);
}
