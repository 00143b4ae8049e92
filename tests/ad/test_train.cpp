// Training behaviour: convergence (XOR, linear regression), optimizers against
// hand-computed steps, schedules, seeded init and seeded dropout.
#include <cmath>
#include <vector>

#include "ringflow/ad/autodiff.hpp"
#include "support/catch.hpp"

namespace ad = ringflow::ad;
using dtensor = ad::basic_tensor<double>;

namespace {
bool near(double a, double b, double tol) { return std::abs(a - b) <= tol; }

// A store with one parameter of the given values and gradients.
ad::parameter_store<double> one_param(std::vector<double> values, std::vector<double> grads) {
  ad::parameter_store<double> store;
  auto p = store.add("p", {static_cast<ad::index>(values.size())});
  std::copy(values.begin(), values.end(), p.data().begin());
  std::copy(grads.begin(), grads.end(), p.grad_data().begin());
  return store;
}
}  // namespace

TEST_CASE("XOR: a 2-layer MLP converges", "[ad][train]") {
  ad::mlp model({2, 8, 2}, ad::activation::tanh, 1234);
  ad::adamw opt(model.parameters(), {.lr = 0.05, .weight_decay = 0.0});
  const std::vector<float> inputs = {0, 0, 0, 1, 1, 0, 1, 1};
  const std::vector<int> labels = {0, 1, 1, 0};
  auto x = ad::tensor::from_data(inputs.data(), {4, 2});
  float loss_value = 0;
  for (int step = 0; step < 300; ++step) {
    model.zero_grad();
    auto loss = ad::softmax_cross_entropy(model(x), labels);
    loss.backward();
    opt.step();
    loss_value = loss.item();
  }
  INFO("final loss " << loss_value);
  CHECK(loss_value < 0.05f);
  ad::no_grad guard;
  CHECK(ad::argmax_rows(model(x)) == labels);
}

TEST_CASE("linear regression converges to the true weights", "[ad][train]") {
  // y = x . (2, -3, 0.5) + 1, 64 samples.
  ad::generator rng(3);
  std::vector<float> xs(64 * 3), ys(64);
  for (int i = 0; i < 64; ++i) {
    for (int j = 0; j < 3; ++j) xs[i * 3 + j] = static_cast<float>(2 * ad::uniform01(rng) - 1);
    ys[i] = 2 * xs[i * 3] - 3 * xs[i * 3 + 1] + 0.5f * xs[i * 3 + 2] + 1;
  }
  auto x = ad::tensor::from_data(xs.data(), {64, 3});
  auto y = ad::tensor::from_data(ys.data(), {64, 1});
  ad::linear model(3, 1, 5);
  ad::sgd opt(model.parameters(), {.lr = 0.1, .momentum = 0.9});
  for (int step = 0; step < 300; ++step) {
    opt.zero_grad();
    ad::mse(model(x), y).backward();
    opt.step();
  }
  auto w = model.weight().value();
  CHECK(near(w(0, 0), 2.0, 1e-3));
  CHECK(near(w(1, 0), -3.0, 1e-3));
  CHECK(near(w(2, 0), 0.5, 1e-3));
  CHECK(near(model.bias().value()(0, 0), 1.0, 1e-3));
}

TEST_CASE("SGD steps against hand-computed values", "[ad][optim]") {
  SECTION("plain with weight decay") {
    auto store = one_param({1.0, -2.0}, {0.5, 0.25});
    ad::basic_sgd<double> opt(store, {.lr = 0.1, .weight_decay = 0.01});
    opt.step();
    // p - lr (g + wd p)
    CHECK(near(store.all_values()[0], 0.949, 1e-12));
    CHECK(near(store.all_values()[1], -2.023, 1e-12));
  }
  SECTION("momentum") {
    auto store = one_param({1.0}, {0.5});
    ad::basic_sgd<double> opt(store, {.lr = 0.1, .momentum = 0.9});
    opt.step();  // v = g = 0.5; p = 1 - 0.05
    CHECK(near(store.all_values()[0], 0.95, 1e-12));
    opt.step();  // v = 0.9*0.5 + 0.5 = 0.95; p = 0.95 - 0.095
    CHECK(near(store.all_values()[0], 0.855, 1e-12));
  }
  SECTION("Nesterov") {
    auto store = one_param({1.0}, {0.5});
    ad::basic_sgd<double> opt(store, {.lr = 0.1, .momentum = 0.9, .nesterov = true});
    opt.step();  // v = 0.5; d = 0.5 + 0.45 = 0.95; p = 1 - 0.095
    CHECK(near(store.all_values()[0], 0.905, 1e-12));
    opt.step();  // v = 0.95; d = 0.5 + 0.855 = 1.355; p = 0.905 - 0.1355
    CHECK(near(store.all_values()[0], 0.7695, 1e-12));
  }
}

TEST_CASE("AdamW steps against hand-computed values", "[ad][optim]") {
  auto store = one_param({1.0}, {0.5});
  ad::basic_adamw<double> opt(store, {.lr = 0.1, .weight_decay = 0.1});
  opt.step();
  // decay: 1 * (1 - 0.01) = 0.99; m_hat = 0.5, v_hat = 0.25 -> step 0.1 * 0.5 / 0.5
  CHECK(near(store.all_values()[0], 0.89, 1e-7));
  store.all_grads()[0] = -0.25;
  opt.step();
  // m = 0.045 - 0.025 = 0.02, v = 0.999*0.00025 + 0.001*0.0625 = 0.00031225
  // m_hat = 0.02/0.19, v_hat = 0.00031225/0.001999; p = 0.89*0.99 - 0.1 m_hat/sqrt(v_hat)
  CHECK(near(store.all_values()[0], 0.854466299, 1e-7));
  CHECK(opt.steps() == 2);
}

TEST_CASE("AdamW state can be saved and restored", "[ad][optim]") {
  auto a = one_param({1.0, 2.0}, {0.5, -0.5});
  auto b = one_param({1.0, 2.0}, {0.5, -0.5});
  ad::basic_adamw<double> oa(a, {.lr = 0.1});
  oa.step();
  oa.step();
  // b resumes from a's checkpoint.
  std::copy(a.all_values().begin(), a.all_values().end(), b.all_values().begin());
  ad::basic_adamw<double> ob(b, {.lr = 0.1});
  std::copy(oa.first_moment().begin(), oa.first_moment().end(), ob.first_moment().begin());
  std::copy(oa.second_moment().begin(), oa.second_moment().end(), ob.second_moment().begin());
  ob.set_steps(oa.steps());
  oa.step();
  ob.step();
  CHECK(a.all_values()[0] == b.all_values()[0]);
  CHECK(a.all_values()[1] == b.all_values()[1]);
}

TEST_CASE("clip_grad_norm scales all gradients to the limit", "[ad][optim]") {
  auto store = one_param({0.0, 0.0}, {3.0, 4.0});
  CHECK(ad::clip_grad_norm(store, 10.0) == 5.0);
  CHECK(store.all_grads()[0] == 3.0);
  CHECK(ad::clip_grad_norm(store, 1.0) == 5.0);
  CHECK(near(store.all_grads()[0], 0.6, 1e-12));
  CHECK(near(store.all_grads()[1], 0.8, 1e-12));
}

TEST_CASE("an optimizer refuses a re-packed store", "[ad][optim]") {
  ad::sequential net;
  auto& layer = net.add(ad::linear(2, 2, 1));
  ad::adamw opt(layer.parameters());
  net.parameters();  // moves the layer's parameters into the sequential's store
  CHECK_THROWS_AS(opt.step(), ringflow::usage_error);
}

TEST_CASE("learning-rate schedules", "[ad][schedule]") {
  auto step = ad::step_lr(1.0, 10, 0.5);
  CHECK(step(0) == 1.0);
  CHECK(step(9) == 1.0);
  CHECK(step(10) == 0.5);
  CHECK(step(25) == 0.25);

  auto cosine = ad::cosine_lr(1.0, 100, 0.0);
  CHECK(near(cosine(0), 1.0, 1e-12));
  CHECK(near(cosine(50), 0.5, 1e-12));
  CHECK(near(cosine(100), 0.0, 1e-12));
  CHECK(near(cosine(150), 0.0, 1e-12));

  auto warm = ad::linear_warmup(ad::constant_lr(1.0), 4);
  CHECK(warm(0) == 0.25);
  CHECK(warm(1) == 0.5);
  CHECK(warm(3) == 1.0);
  CHECK(warm(100) == 1.0);

  auto wc = ad::warmup_cosine(1.0, 10, 110, 0.1);
  CHECK(near(wc(0), 0.1, 1e-12));
  CHECK(near(wc(9), 1.0, 1e-12));
  CHECK(near(wc(10), 1.0, 1e-12));
  CHECK(near(wc(60), 0.55, 1e-12));
  CHECK(near(wc(110), 0.1, 1e-12));

  // Composition: warm-up into a step schedule.
  auto ws = ad::linear_warmup(ad::step_lr(0.2, 5, 0.1), 2);
  CHECK(near(ws(0), 0.1, 1e-12));
  CHECK(near(ws(2), 0.2, 1e-12));
  CHECK(near(ws(7), 0.02, 1e-12));
}

TEST_CASE("seeded initialization is reproducible and well scaled", "[ad][init]") {
  ad::mlp a({20, 30, 5}, ad::activation::relu, 42);
  ad::mlp b({20, 30, 5}, ad::activation::relu, 42);
  ad::mlp c({20, 30, 5}, ad::activation::relu, 43);
  auto va = a.parameters().all_values();
  auto vb = b.parameters().all_values();
  auto vc = c.parameters().all_values();
  CHECK(std::equal(va.begin(), va.end(), vb.begin()));
  CHECK_FALSE(std::equal(va.begin(), va.end(), vc.begin()));

  // Sample statistics of large draws: mean ~ 0, variance ~ 2 / fan.
  std::vector<double> w(200000);
  const struct {
    ad::init_kind kind;
    double var;
  } cases[] = {{ad::init_kind::kaiming_uniform, 2.0 / 50},
               {ad::init_kind::kaiming_normal, 2.0 / 50},
               {ad::init_kind::xavier_uniform, 2.0 / 80},
               {ad::init_kind::xavier_normal, 2.0 / 80}};
  for (const auto& k : cases) {
    ad::generator rng(7);
    ad::initialize(std::span<double>(w), k.kind, 50, 30, rng);
    double mean = 0, sq = 0;
    for (double v : w) mean += v;
    mean /= static_cast<double>(w.size());
    for (double v : w) sq += (v - mean) * (v - mean);
    const double var = sq / static_cast<double>(w.size());
    INFO("init kind " << static_cast<int>(k.kind));
    CHECK(std::abs(mean) < 0.01 * std::sqrt(k.var) * 10);
    CHECK(std::abs(var / k.var - 1.0) < 0.02);
  }
  // The transforms are our own, so the first draws are pinned.
  ad::generator rng(1);
  const double u = ad::uniform01(rng);
  ad::generator rng2(1);
  CHECK(u == static_cast<double>(rng2() >> 11) * 0x1.0p-53);
}

TEST_CASE("seeded dropout is reproducible; identity in eval and no_grad", "[ad][dropout]") {
  auto x = ad::tensor::full({50, 40}, 1.0f, true);
  ad::generator r1(9), r2(9), r3(10);
  auto a = ad::dropout(x, 0.25, r1);
  auto b = ad::dropout(x, 0.25, r2);
  auto c = ad::dropout(x, 0.25, r3);
  CHECK(a.value() == b.value());
  CHECK(a.value() != c.value());
  int zeros = 0;
  for (float v : a.data()) {
    CHECK((v == 0.0f || std::abs(v - 1.0f / 0.75f) < 1e-6f));
    zeros += v == 0.0f;
  }
  CHECK(std::abs(zeros / 2000.0 - 0.25) < 0.05);
  CHECK(ad::dropout(x, 0.25, r1, /*training=*/false).node() == x.node());

  ad::basic_dropout_layer<float> layer(0.5, 3);
  layer.eval();
  CHECK(layer(x).node() == x.node());
  layer.train();
  CHECK(layer(x).node() != x.node());

  // An mlp with dropout is reproducible for a seed in training mode.
  ad::mlp m1({40, 16, 2}, ad::activation::relu, 5, {.dropout = 0.5});
  ad::mlp m2({40, 16, 2}, ad::activation::relu, 5, {.dropout = 0.5});
  CHECK(m1(x).value() == m2(x).value());
  m1.eval();
  auto e1 = m1(x);
  auto e2 = m1(x);
  CHECK(e1.value() == e2.value());
}
