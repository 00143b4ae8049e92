// ad::embedding: gather forward, sparse row gradients against a dense table
// gradient and central differences, sparse optimizer updates, bad ids.
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "ringflow/ad/autodiff.hpp"
#include "support/catch.hpp"
#include "support/gradcheck.hpp"

namespace {

// The dense [rows, dim] gradient a sparse one stands for.
template <class S>
std::vector<S> densify(ad::sparse_rows_grad<S> g, std::size_t rows) {
  g.coalesce();
  std::vector<S> out(rows * g.width, S(0));
  for (std::size_t k = 0; k < g.indices.size(); ++k) {
    for (std::size_t j = 0; j < g.width; ++j) {
      out[static_cast<std::size_t>(g.indices[k]) * g.width + j] = g.values[k * g.width + j];
    }
  }
  return out;
}

const std::vector<std::int64_t> kIds = {4, 1, 4, 0, 9, 1, 1, 7};  // repeats on purpose

}  // namespace

TEST_CASE("embedding: forward gathers the rows of the ids, fields side by side",
          "[ad][embedding]") {
  ad::embedding emb(10, 3, /*seed=*/5);
  const auto w = emb.weight().data();
  auto y = emb.lookup(kIds, /*fields=*/2);
  REQUIRE(y.rows() == 4);
  REQUIRE(y.cols() == 6);
  for (std::size_t k = 0; k < kIds.size(); ++k) {
    for (std::size_t j = 0; j < 3; ++j) {
      CHECK(y.data()[k * 3 + j] == w[static_cast<std::size_t>(kIds[k]) * 3 + j]);
    }
  }
  // The module form reads the ids from a tensor's values: [B, F] -> [B, F * dim].
  std::vector<float> as_values(kIds.begin(), kIds.end());
  auto x = ad::tensor::from_vector(as_values, {4, 2});
  auto z = emb(x);
  REQUIRE(z.rows() == 4);
  REQUIRE(z.cols() == 6);
  for (std::size_t i = 0; i < z.data().size(); ++i) CHECK(z.data()[i] == y.data()[i]);
}

TEST_CASE("embedding: the sparse gradient equals the dense one bit for bit", "[ad][embedding]") {
  ad::embedding sparse(10, 3, 5);
  ad::embedding dense(10, 3, 5, {.sparse = false});
  REQUIRE(sparse.weight().sparse_grad() != nullptr);
  REQUIRE(dense.weight().sparse_grad() == nullptr);
  ad::linear head(6, 2, 9);
  auto loss_of = [&](ad::embedding& e) {
    return ad::mean(ad::mul(head(e.lookup(kIds, 2)), head(e.lookup(kIds, 2))));
  };
  loss_of(sparse).backward();
  loss_of(dense).backward();
  const auto& sg = *sparse.weight().sparse_grad();
  // Two lookups of 8 ids: 16 rows recorded, no dense gradient touched.
  CHECK(sg.indices.size() == 16);
  CHECK(!sg.coalesced);
  for (float g : sparse.weight().grad_data()) CHECK(g == 0.0f);
  auto coalesced = sg;
  coalesced.coalesce();
  CHECK(coalesced.indices == std::vector<std::int64_t>{0, 1, 4, 7, 9});
  const auto from_sparse = densify(sg, 10);
  const auto d = dense.weight().grad_data();
  REQUIRE(from_sparse.size() == d.size());
  for (std::size_t i = 0; i < d.size(); ++i) {
    INFO("element " << i);
    CHECK(from_sparse[i] == d[i]);
  }
  // zero_grad clears the sparse rows too.
  sparse.weight().zero_grad();
  CHECK(sg.empty());
}

TEST_CASE("embedding: gradcheck of the sparse gradient against central differences",
          "[ad][embedding][gradcheck]") {
  ad::basic_embedding<double> emb(6, 2, 3);
  const auto table = emb.weight();
  const std::vector<std::int64_t> ids = {5, 2, 5, 0};
  const dtensor weight = random_tensor({2, 4}, 11).detach();
  auto objective = [&] { return ad::sum(ad::mul(ad::tanh(emb.lookup(ids, 2)), weight)); };
  table.zero_grad();
  objective().backward();
  const auto analytic = densify(*table.sparse_grad(), 6);
  const double h = 1e-6;
  for (std::size_t j = 0; j < analytic.size(); ++j) {
    const double orig = table.data()[j];
    table.data()[j] = orig + h;
    const double fp = objective().item();
    table.data()[j] = orig - h;
    const double fm = objective().item();
    table.data()[j] = orig;
    const double numeric = (fp - fm) / (2 * h);
    INFO("element " << j << ": analytic " << analytic[j] << " numeric " << numeric);
    CHECK(std::abs(numeric - analytic[j]) <= 1e-6 * (1.0 + std::abs(numeric)));
  }
  // The dense table's gradient goes through the generic check too.
  check_gradients("embedding dense", {random_tensor({6, 2}, 4)},
                  [&](const inputs_t& in) { return ad::embedding_lookup(in[0], ids, 2); });
}

TEST_CASE("embedding: sparse SGD matches dense SGD exactly; sparse updates are lazy",
          "[ad][embedding]") {
  auto train = [](bool sparse, ad::sgd_options so, int steps) {
    ad::sequential net;
    net.add(ad::embedding(50, 4, 1, {.sparse = sparse}));
    net.add(ad::linear(8, 1, 2));
    ad::sgd opt(net.parameters(), so);
    for (int t = 0; t < steps; ++t) {
      std::vector<float> ids;
      for (int b = 0; b < 6; ++b) ids.push_back(static_cast<float>((t * 7 + b * 3) % 20));
      opt.zero_grad();
      auto x = ad::tensor::from_vector(ids, {3, 2});
      ad::mean(ad::mul(net(x), net(x))).backward();
      opt.step();
    }
    auto v = net.parameters().all_values();
    return std::vector<float>(v.begin(), v.end());
  };
  const auto s = train(true, {.lr = 0.1}, 5);
  const auto d = train(false, {.lr = 0.1}, 5);
  REQUIRE(s.size() == d.size());
  for (std::size_t i = 0; i < s.size(); ++i) {
    INFO("element " << i);
    CHECK(s[i] == d[i]);
  }
  // Rows 20..49 are never looked up: lazy momentum leaves them untouched, and
  // so does plain dense SGD (their gradient is zero, no weight decay).
  const auto init = train(true, {.lr = 0.1}, 0);
  const auto m = train(true, {.lr = 0.1, .momentum = 0.9, .weight_decay = 0.01}, 5);
  for (std::size_t i = 20 * 4; i < 50 * 4; ++i) CHECK(m[i] == init[i]);
  CHECK(m[0] != init[0]);
}

TEST_CASE("embedding: sparse AdamW updates only the touched rows", "[ad][embedding]") {
  ad::embedding emb(8, 2, 1);
  auto params = emb.parameters();
  const std::vector<float> before(params.all_values().begin(), params.all_values().end());
  ad::adamw opt(params, {.lr = 0.01, .weight_decay = 0.1});
  const std::vector<std::int64_t> ids = {3, 5, 3};
  ad::sum(emb.lookup(ids)).backward();
  opt.step();
  const auto after = params.all_values();
  for (std::size_t r = 0; r < 8; ++r) {
    const bool touched = r == 3 || r == 5;
    for (std::size_t j = 0; j < 2; ++j) {
      INFO("row " << r);
      CHECK((after[r * 2 + j] != before[r * 2 + j]) == touched);
    }
  }
  // The first Adam step moves a touched element by about lr (m/sqrt(v) = sign(g)).
  CHECK(std::abs(after[6] - before[6] * (1 - 0.01f * 0.1f) + 0.01f) < 1e-4f);
}

TEST_CASE("embedding: an id outside the table names the id, the size and the rank",
          "[ad][embedding][errors]") {
  ad::embedding emb(100, 4, 1, {.rank = 3});
  const std::vector<std::int64_t> bad = {1, 100};
  try {
    (void)emb.lookup(bad);
    FAIL("no error");
  } catch (const ringflow::usage_error& e) {
    const std::string m = e.what();
    INFO(m);
    CHECK(m.find("id 100") != std::string::npos);
    CHECK(m.find("100 rows") != std::string::npos);
    CHECK(m.find("rank 3") != std::string::npos);
  }
  const std::vector<std::int64_t> negative = {-1};
  CHECK_THROWS_AS(emb.lookup(negative), ringflow::usage_error);
  const std::vector<std::int64_t> three = {1, 2, 3};
  CHECK_THROWS_AS(emb.lookup(three, 2), ringflow::usage_error);
  auto fractional = ad::tensor::from_vector({1.5f}, {1, 1});
  CHECK_THROWS_AS(emb(fractional), ringflow::usage_error);
  CHECK_THROWS_AS(ad::embedding(0, 4), ringflow::usage_error);
}
