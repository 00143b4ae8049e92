// ringflow::cuda without a GPU: reports none, never crashes.
#include "ringflow/core/error.hpp"
#include "ringflow/cuda/device.hpp"
#include "support/catch.hpp"

TEST_CASE("cuda discovery is safe without a GPU", "[core][cuda]") {
  const int n = ringflow::cuda::device_count();
  CHECK(n >= 0);
  CHECK(ringflow::cuda::available() == (n > 0));
  if (!ringflow::cuda::compiled_with_cuda()) {
    CHECK_THROWS_AS(ringflow::cuda::device_name(0), ringflow::not_supported_error);
  }
}
