#!/usr/bin/env bash
# The test command: install dependencies, build ringflow, run every CTest test (unit, mpi, cuda).
#
#   scripts/run_tests.sh [extra ctest arguments, e.g. -L unit or -R install]
# Environment: BUILD_DIR (default build), JOBS (build jobs, default 2),
# CTEST_PARALLEL_LEVEL (tests at once; default 1), CMAKE_ARGS (extra configure
# flags), BUILD_TYPE (default Release), RINGFLOW_SKIP_DEPS=1 (no apt-get).
# Exits non-zero when the build or any test fails. GPU tests report "skipped"
# on machines without a GPU.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
BUILD_DIR=${BUILD_DIR:-build}
JOBS=${JOBS:-2}
BUILD_TYPE=${BUILD_TYPE:-Release}
read -r -a extra_cmake_args <<<"${CMAKE_ARGS:-}"

step() { printf '\n== %s\n' "$*"; }
started=$SECONDS

step "dependencies"
scripts/install_deps.sh

step "configure and build ($BUILD_DIR, $BUILD_TYPE, -j$JOBS)"
cmake -S . -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE="$BUILD_TYPE" -DRINGFLOW_BUILD_TESTS=ON \
  "${extra_cmake_args[@]}"
cmake --build "$BUILD_DIR" -j "$JOBS"

step "tests"
status=0
ctest --test-dir "$BUILD_DIR" --output-on-failure --no-tests=error "$@" || status=$?

step "run_tests: $( ((status == 0)) && echo passed || echo FAILED ) in $((SECONDS - started)) s"
exit "$status"
