// Schedule generators, the text format, the builder, and the verifier on
// good schedules and deliberately broken ones.
#include <algorithm>
#include <cmath>
#include <string>

#include "ringflow/core/error.hpp"
#include "ringflow/pipeline/schedule.hpp"
#include "ringflow/pipeline/verify.hpp"
#include "support/catch.hpp"

using namespace ringflow;
using namespace ringflow::pipeline;

namespace {
// The usage_error message verify() throws for `s` ("" when it passes).
std::string verify_error(const schedule& s) {
  try {
    verify(s);
  } catch (const usage_error& e) {
    return e.what();
  }
  return {};
}

bool contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

// Removes the first occurrence of `ins` from rank r's program.
void erase(schedule& s, int r, instruction ins) {
  auto& p = s.programs[static_cast<std::size_t>(r)];
  p.erase(std::find(p.begin(), p.end(), ins));
}
}  // namespace

TEST_CASE("generated schedules verify for every size, with the textbook bubble", "[pipeline]") {
  for (bool split : {false, true}) {
    for (int p = 1; p <= 5; ++p) {
      for (int m = 1; m <= 9; ++m) {
        INFO("p=" << p << " m=" << m << " split=" << split);
        const generate_options o{.split_backward = split};
        const auto g = verify(gpipe(p, m, o));
        const auto f = verify(one_f_one_b(p, m, o));
        for (int r = 0; r < p; ++r) {
          CHECK(g.peak_activations[static_cast<std::size_t>(r)] == m);
          CHECK(f.peak_activations[static_cast<std::size_t>(r)] == std::min(p - r, m));
        }
        if (!split) {
          CHECK(std::abs(g.bubble_fraction - textbook_bubble(p, m)) < 1e-12);
          CHECK(std::abs(f.bubble_fraction - textbook_bubble(p, m)) < 1e-12);
        }
        for (int v = 2; v <= 3; ++v) {
          INFO("v=" << v);
          const auto s = interleaved_1f1b(p, v, m, o);
          CHECK(s.stages() == p * v);
          const auto i = verify(s);
          if (!split && m % p == 0 && p > 1) CHECK(i.bubble_fraction < f.bubble_fraction);
        }
      }
    }
  }
}

TEST_CASE("interleaving cuts the predicted bubble about v-fold", "[pipeline]") {
  const int p = 4, m = 8;
  const double plain = verify(one_f_one_b(p, m)).bubble_fraction;
  const auto s = interleaved_1f1b(p, 2, m);
  // Each chunk is half a stage: forward 0.5, backward 1.
  const double inter = verify(s, stage_costs::uniform(s.stages(), 0.5, 1.0)).bubble_fraction;
  CHECK(inter < 0.65 * plain);
}

TEST_CASE("text format round-trips and reports bad tokens", "[pipeline]") {
  for (const auto& s : {gpipe(3, 4), one_f_one_b(2, 5, {.split_backward = true}),
                        interleaved_1f1b(2, 2, 3), forward_pass({0, 1, 0, 1}, 2, 2)}) {
    const auto back = parse_schedule(to_text(s));
    CHECK(back.name == s.name);
    CHECK(back.micro_batches == s.micro_batches);
    CHECK(back.stage_rank == s.stage_rank);
    CHECK(back.programs == s.programs);
    CHECK(back.forward_only == s.forward_only);
  }
  const auto s = parse_schedule(
      "# two stages, one micro-batch\n"
      "schedule tiny micro_batches 1\n"
      "rank 0: F0.0 SA0.0\n"
      "        RG0.0 B0.0 REDUCE STEP\n"
      "rank 1: RA1.0, F1.0, B1.0, SG1.0, REDUCE, STEP\n");
  CHECK(s.stages() == 2);
  CHECK(s.programs[0].size() == 6);
  CHECK_NOTHROW(verify(s));
  CHECK_THROWS_AS(parse_schedule("schedule x micro_batches 1\nrank 0: F0.0 X1.2\n"), usage_error);
  std::string e;
  try {
    parse_schedule("schedule x micro_batches 1\nrank 0: F0.0 X1.2\n");
  } catch (const usage_error& x) {
    e = x.what();
  }
  CHECK(contains(e, "line 2"));
  CHECK(contains(e, "'X1.2'"));
}

TEST_CASE("builder writes the documented schedule", "[pipeline]") {
  schedule_builder b(2, 2, 1);
  b.on(0).forward(0, 0).send_activation(0, 0).recv_grad(0, 0).backward(0, 0);
  b.on(1).recv_activation(1, 0).forward(1, 0).backward(1, 0).send_grad(1, 0);
  const auto r = verify(b.build());
  CHECK(r.peak_activations == std::vector<int>{1, 1});
  CHECK_THROWS_AS(b.on(2), usage_error);
}

TEST_CASE("verifier: a missing receive is named", "[pipeline]") {
  auto s = one_f_one_b(2, 3);
  erase(s, 1, {op_kind::recv_activation, 1, 2});
  const auto e = verify_error(s);
  INFO(e);
  CHECK(contains(e, "RA1.2 is missing from rank 1"));
}

TEST_CASE("verifier: a missing send is named", "[pipeline]") {
  auto s = gpipe(3, 2);
  erase(s, 2, {op_kind::send_grad, 2, 1});
  const auto e = verify_error(s);
  INFO(e);
  CHECK(contains(e, "SG2.1 is missing from rank 2"));
}

TEST_CASE("verifier: swapped order deadlocks and shows the stuck grid", "[pipeline]") {
  // Rank 0 waits for the gradient of micro-batch 0 before sending its activation.
  schedule_builder b(2, 2, 1);
  b.on(0).forward(0, 0).recv_grad(0, 0).send_activation(0, 0).backward(0, 0);
  b.on(1).recv_activation(1, 0).forward(1, 0).backward(1, 0).send_grad(1, 0);
  const auto e = verify_error(b.build());
  INFO(e);
  CHECK(contains(e, "deadlocks after 1 of 8 instructions"));
  CHECK(contains(e, "[RG0.0]"));
  CHECK(contains(e, "[RA1.0]"));
  CHECK(contains(e, "<SA0.0>"));
  CHECK(contains(e, "<SG1.0>"));
  CHECK(contains(e, "rank 1 step 0: RA1.0 waits for SA0.0 at rank 0 step 2"));
  CHECK(contains(e, "rank 0   F0.0"));

  // A realistic one: the warm-up counts of 1F1B swapped between the ranks.
  const auto swapped = parse_schedule(
      "schedule swapped micro_batches 2\n"
      "rank 0: F0.0 SA0.0 RG0.0 B0.0 F0.1 SA0.1 RG0.1 B0.1\n"
      "rank 1: RA1.0 F1.0 RA1.1 F1.1 B1.0 SG1.0 B1.1 SG1.1\n");
  const auto e2 = verify_error(swapped);
  INFO(e2);
  CHECK(contains(e2, "deadlocks after 4 of 16 instructions"));
  CHECK(contains(e2, "[RG0.0]"));
  CHECK(contains(e2, "[RA1.1]"));
  CHECK(contains(e2, "<SA0.1>"));
  CHECK(contains(e2, "<SG1.0>"));
}

TEST_CASE("verifier: mismatched micro-batch ids", "[pipeline]") {
  auto s = one_f_one_b(2, 2);
  // Rank 1 receives micro-batch 1 where it should receive 0.
  auto& p = s.programs[1];
  auto r0 = std::find(p.begin(), p.end(), instruction{op_kind::recv_activation, 1, 0});
  auto r1 = std::find(p.begin(), p.end(), instruction{op_kind::recv_activation, 1, 1});
  std::iter_swap(r0, r1);
  const auto e = verify_error(s);
  INFO(e);
  CHECK(contains(e, "F1.0 at rank 1 step 1 uses its input, but RA1.0 only comes at step 4"));

  auto t = gpipe(2, 2);
  t.programs[0][0].micro_batch = 5;
  CHECK(contains(verify_error(t), "micro-batch 5, outside [0, 2)"));
}

TEST_CASE("verifier: other broken schedules", "[pipeline]") {
  auto dup = gpipe(2, 2);
  dup.programs[0].push_back({op_kind::forward, 0, 1});
  CHECK(contains(verify_error(dup), "F0.1 appears twice"));

  auto wrong_rank = gpipe(2, 1);
  wrong_rank.programs[0][0].stage = 1;
  CHECK(contains(verify_error(wrong_rank), "stage 1 lives on rank 1, not on rank 0"));

  auto early_step = gpipe(2, 2);
  auto& p = early_step.programs[0];
  std::rotate(p.begin(), p.end() - 1, p.end());  // STEP first
  CHECK(contains(verify_error(early_step), "STEP at rank 0 step 0 comes before"));

  auto both = one_f_one_b(1, 1);
  both.programs[0].insert(both.programs[0].begin() + 1, {op_kind::backward_input, 0, 0});
  CHECK(contains(verify_error(both), "has both B and BI/BW"));

  auto no_w = one_f_one_b(2, 2, {.split_backward = true});
  erase(no_w, 1, {op_kind::backward_weight, 1, 1});
  CHECK(contains(verify_error(no_w), "BW1.1 is missing"));

  auto send_last = gpipe(2, 1);
  send_last.programs[1].push_back({op_kind::send_activation, 1, 0});
  CHECK(contains(verify_error(send_last), "stage 1 is the last stage"));

  auto bad_cost = gpipe(2, 1);
  CHECK_THROWS_AS(verify(bad_cost, stage_costs::uniform(3, 1, 2)), usage_error);
  CHECK_THROWS_AS(make_schedule("zigzag", 2, 2), usage_error);
  CHECK_THROWS_AS(gpipe(0, 2), usage_error);
}

TEST_CASE("ASCII grid and SVG pictures", "[pipeline]") {
  const auto g = gpipe(2, 2);
  const std::string grid = ascii_grid(g);
  INFO(grid);
  CHECK(contains(grid, "gpipe: 2 ranks, 2 stages, 2 micro-batches; bubble 0.333"));
  CHECK(contains(grid, "rank 0 | F0 F1 .  .  .  B0 B0 B1 B1\n"));
  CHECK(contains(grid, "rank 1 | .  F0 F1 B0 B0 B1 B1 .  .\n"));
  const auto i = interleaved_1f1b(2, 2, 2);
  CHECK(contains(ascii_grid(i, stage_costs::uniform(4, 0.5, 1)), "F0.1"));
  const auto r = verify(i);
  const std::string svg = to_svg(i, r, "interleaved");
  CHECK(svg.rfind("<svg", 0) == 0);
  CHECK(contains(svg, "</svg>"));
  std::size_t rects = 0;
  for (std::size_t at = svg.find("<rect"); at != std::string::npos; at = svg.find("<rect", at + 1))
    ++rects;
  CHECK(rects == r.timeline.size() + 1 + 2 + 4);  // ops, background, lanes, legend
  CHECK(contains(to_svg(g, verify(g)), "forward"));
}
