// One include for Catch2 v2 (Debian 12: catch2/catch.hpp) and v3 (catch_all.hpp).
#pragma once

#if __has_include(<catch2/catch_all.hpp>)
#include <catch2/catch_all.hpp>
#define RINGFLOW_CATCH2_V3 1
#else
#include <catch2/catch.hpp>
// v3 spells it Catch::Approx; v2 keeps it in Catch::Detail. One name for both.
namespace Catch {
using Detail::Approx;
}
#endif
