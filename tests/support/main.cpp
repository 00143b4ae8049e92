// Test entry point for unit tests (no MPI). Works with Catch2 v2 and v3.
#if __has_include(<catch2/catch_session.hpp>)
#include <catch2/catch_session.hpp>
#else
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>
#endif

#include <cstdlib>

int main(int argc, char** argv) {
  // Tests run with checked collectives unless the environment says otherwise.
  setenv("RINGFLOW_CHECK", "1", /*overwrite=*/0);
  return Catch::Session().run(argc, argv);
}
