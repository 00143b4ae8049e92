// GPU discovery (runs only where a GPU is visible; skipped otherwise).
#include <string>

#include "ringflow/cuda/device.hpp"
#include "support/catch.hpp"

TEST_CASE("a visible GPU has a name", "[cuda]") {
  REQUIRE(ringflow::cuda::compiled_with_cuda());
  REQUIRE(ringflow::cuda::device_count() >= 1);
  const std::string name = ringflow::cuda::device_name(0);
  INFO(name);
  CHECK(!name.empty());
  CHECK(name.find("NVIDIA") != std::string::npos);
}
