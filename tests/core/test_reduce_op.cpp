// Reduce ops: values, NaN handling, avg rounding, dtype traits.
#include <cmath>
#include <cstdint>
#include <limits>

#include "ringflow/core/dtype.hpp"
#include "ringflow/core/reduce_op.hpp"
#include "support/catch.hpp"

using namespace ringflow;

TEST_CASE("reduce ops combine two values", "[core][op]") {
  CHECK(sum(2, 3) == 5);
  CHECK(prod(2.5, 4.0) == 10.0);
  CHECK(ringflow::min(-1, 4) == -1);
  CHECK(ringflow::max(-1, 4) == 4);
  CHECK(static_cast<float>(sum(half(1.5f), half(2.25f))) == 3.75f);
  CHECK(static_cast<float>(prod(bfloat16(3.0f), bfloat16(-2.0f))) == -6.0f);
  // Integer wrap is modular (C++20), so any reduction order gives one answer.
  CHECK(sum(std::int8_t{100}, std::int8_t{100}) == std::int8_t{-56});
}

TEST_CASE("min and max propagate NaN", "[core][op]") {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  CHECK(std::isnan(ringflow::min(nan, 1.0f)));
  CHECK(std::isnan(ringflow::min(1.0f, nan)));
  CHECK(std::isnan(ringflow::max(nan, 1.0f)));
  CHECK(std::isnan(ringflow::max(1.0f, nan)));
  CHECK(std::isnan(static_cast<float>(ringflow::max(half(nan), half(2.0f)))));
}

TEST_CASE("avg divides once at the end", "[core][op]") {
  CHECK(finish(avg, 7, 2) == 3);  // integer: truncates toward zero
  CHECK(finish(avg, -7, 2) == -3);
  CHECK(finish(avg, 7.0f, 2) == 3.5f);
  CHECK(finish(sum, 7, 2) == 7);  // other ops: identity
  CHECK(static_cast<float>(finish(avg, half(1.0f), 3)) == static_cast<float>(half(1.0f / 3.0f)));
}

TEST_CASE("dtype traits name and size every element type", "[core][dtype]") {
  STATIC_REQUIRE(dtype_of<float> == dtype::f32);
  STATIC_REQUIRE(dtype_of<const double> == dtype::f64);
  STATIC_REQUIRE(dtype_of<half> == dtype::f16);
  STATIC_REQUIRE(dtype_of<bfloat16> == dtype::bf16);
  STATIC_REQUIRE(dtype_size(dtype::i64) == 8);
  STATIC_REQUIRE(dtype_size(dtype::u8) == 1);
  CHECK(dtype_name(dtype::bf16) == "bfloat16");
  CHECK(op_name(op_kind::avg) == "avg");
  STATIC_REQUIRE(element<std::int8_t>);
  STATIC_REQUIRE(!element<char16_t>);
}
