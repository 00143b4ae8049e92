// serve::teacher_logits on the thread backend: every rank gets the one-process logits, with any
// rank count and chunk, and a teacher of the wrong width is refused on every rank.
#include <atomic>
#include <cstring>
#include <vector>

#include "ringflow/ad/autodiff.hpp"
#include "ringflow/backends/local.hpp"
#include "ringflow/core/error.hpp"
#include "ringflow/serve/distill.hpp"
#include "support/catch.hpp"
#include "support/noise.hpp"

using namespace ringflow;
namespace ad = ringflow::ad;
namespace sv = ringflow::serve;

TEST_CASE("teacher_logits gives every rank the one-process logits", "[serve][distill]") {
  const ad::index rows = 203, features = 12, classes = 5;
  const auto x = testing::noise(static_cast<std::size_t>(rows * features), 7);
  // What one process computes, a whole-batch forward (a teacher with
  // dropout would differ: teacher_logits runs it in evaluation mode).
  ad::mlp reference({features, 16, classes}, ad::activation::relu, 3);
  reference.eval();
  std::vector<float> want;
  {
    ad::no_grad guard;
    const auto y = reference(ad::tensor::from_data(x.data(), {rows, features}));
    want.assign(y.data().begin(), y.data().end());
  }
  for (const int np : {1, 2, 3, 5}) {
    for (const ad::index chunk : {ad::index{1}, ad::index{17}, ad::index{64}, ad::index{512}}) {
      std::vector<std::vector<float>> got(static_cast<std::size_t>(np));
      std::vector<int> training_after(static_cast<std::size_t>(np), 0);
      local::run(np, [&](communicator& c) {
        ad::mlp teacher({features, 16, classes}, ad::activation::relu, 3);  // same weights
        teacher.train();
        got[static_cast<std::size_t>(c.rank())] =
            sv::teacher_logits(c, teacher, x.data(), rows, features, classes, chunk);
        training_after[static_cast<std::size_t>(c.rank())] = teacher.training() ? 1 : 0;
      });
      INFO("ranks " << np << " chunk " << chunk);
      for (int r = 0; r < np; ++r) {
        const auto& g = got[static_cast<std::size_t>(r)];
        REQUIRE(g.size() == want.size());
        // The products of a chunk may round differently from the whole
        // batch's (blocked sgemm), never by more than a few ulps here.
        for (std::size_t i = 0; i < g.size(); ++i)
          CHECK(g[i] == Catch::Approx(want[i]).margin(1e-5));
        // Every rank holds the same bytes: each entry had one contributor.
        CHECK(std::memcmp(g.data(), got[0].data(), g.size() * sizeof(float)) == 0);
        CHECK(training_after[static_cast<std::size_t>(r)] == 1);
      }
    }
  }
}

TEST_CASE("teacher_logits refuses a teacher of the wrong width on every rank", "[serve][distill]") {
  const ad::index rows = 40, features = 6;
  const auto x = testing::noise(static_cast<std::size_t>(rows * features), 9);
  std::atomic<int> refused{0};
  // Chunk 32: rank 1 of 3 has rows 32-39 and rank 2 none, yet both must
  // throw rather than wait in the allreduce.
  local::run(3, [&](communicator& c) {
    ad::mlp teacher({features, 8, 4}, ad::activation::relu, 1);
    try {
      (void)sv::teacher_logits(c, teacher, x.data(), rows, features, /*classes=*/10, 32);
    } catch (const usage_error&) {
      ++refused;
    }
  });
  CHECK(refused == 3);
  bool bad_chunk_refused = false;
  std::size_t empty_size = 1;
  local::run(1, [&](communicator& c) {
    ad::mlp teacher({features, 8, 4}, ad::activation::relu, 1);
    try {
      (void)sv::teacher_logits(c, teacher, x.data(), rows, features, 4, /*chunk=*/0);
    } catch (const usage_error&) {
      bad_chunk_refused = true;
    }
    empty_size = sv::teacher_logits(c, teacher, x.data(), 0, features, 4).size();
  });
  CHECK(bad_chunk_refused);
  CHECK(empty_size == 0);
}
