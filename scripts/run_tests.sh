#!/usr/bin/env bash
# The test command: install dependencies, check the format (scripts/check_format.sh), build
# ringflow, run every CTest test (unit, mpi, cuda), then the sanitizer stages (ASan+UBSan, TSan;
# see docs/testing.md).
#
#   scripts/run_tests.sh [extra ctest arguments, e.g. -L unit or -R install]
# The first stage builds with RINGFLOW_WARNINGS_AS_ERRORS=ON.
# Environment: BUILD_DIR (default build), JOBS (build jobs, default 2),
# CTEST_PARALLEL_LEVEL (tests at once; default 1), CMAKE_ARGS (extra configure
# flags), BUILD_TYPE (default Release), RINGFLOW_SKIP_DEPS=1 (no apt-get),
# RINGFLOW_SANITIZERS=0 (skip the sanitizer stages). The extra ctest
# arguments apply to the first test stage only.
# Exits non-zero when the build or any test fails, or any sanitizer reports.
# GPU tests report "skipped" on machines without a GPU.
#
# Sanitizer stages (Debug -O1, CUDA off, trees build-asan and build-tsan):
#   asan  RINGFLOW_SANITIZE=address,undefined, the library, the tests and the tools
#         (not the examples, the benchmark programs or the install target: their
#         bad-flag and packaging tests run in the first stage); ctest -L 'unit|mpi'
#         (the unit tests, the fuzz and doctor tests, and test_mpi under
#         mpirun -np 1..5)
#   tsan  RINGFLOW_SANITIZE=thread, the threaded tests only (test_comm, test_coll,
#         test_train, test_pipeline, test_serve); ctest -L unit there
# A report fails its test (halt_on_error, -fno-sanitize-recover; the options are
# set per test by cmake/ringflow_testing.cmake), and so the stage.
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

# ccache makes rebuilds of an unchanged tree take seconds (the sanitizer
# trees, and the add_subdirectory tests, which compile the main tree's
# library sources again with the same flags); it is optional
# (install_deps.sh installs it on Debian).
launcher=()
if command -v ccache >/dev/null 2>&1; then
  launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DCMAKE_C_COMPILER_LAUNCHER=ccache)
fi

step "format (scripts/check_format.sh)"
status=0
scripts/check_format.sh || status=1

step "configure and build ($BUILD_DIR, $BUILD_TYPE, -j$JOBS)"
# Warnings are errors here (docs/testing.md): every target, ringflow_cuda's
# .cu files included, must build clean.
cmake -S . -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE="$BUILD_TYPE" -DRINGFLOW_BUILD_TESTS=ON \
  -DRINGFLOW_WARNINGS_AS_ERRORS=ON "${launcher[@]}" "${extra_cmake_args[@]}"
cmake --build "$BUILD_DIR" -j "$JOBS"

step "tests"
ctest --test-dir "$BUILD_DIR" --output-on-failure --no-tests=error "$@" || status=$?
echo "run_tests: build and tests took $((SECONDS - started)) s"

# sanitizer_stage NAME SANITIZE CTEST_LABEL [TARGETS...]: configure build-NAME
# with RINGFLOW_SANITIZE=SANITIZE and without the examples, the benchmark
# programs and the install target (the first stage runs their tests), then
# either build the rest and run the tests labelled CTEST_LABEL, or build only
# the test binaries TARGETS and run the tests of that name (the tests of the
# others are registered but unbuilt).
sanitizer_stage() {
  local name=$1 sanitize=$2 label=$3
  shift 3
  local dir=build-$name t0=$SECONDS rc=0
  # -LE fault: the fault-injection tests (fault_injection, flight_doctor) stop,
  # kill and abort ranks on purpose; they run in the first stage only.
  local -a targets=() select=(-L "$label" -LE fault)
  local -a extra=(-DRINGFLOW_BUILD_EXAMPLES=OFF -DRINGFLOW_BUILD_BENCH=OFF -DRINGFLOW_INSTALL=OFF)
  for t in "$@"; do targets+=(--target "$t"); done
  if (($# > 0)); then
    select=(-L "$label" -LE fault -R "^($(IFS='|'; echo "$*"))\$")
  fi
  step "sanitizer stage $name ($sanitize, $dir, ctest -L '$label')"
  cmake -S . -B "$dir" -DCMAKE_BUILD_TYPE=Debug -DCMAKE_CXX_FLAGS_DEBUG="-g -O1" \
    -DCMAKE_C_FLAGS_DEBUG="-g -O1" -DRINGFLOW_WITH_CUDA=OFF -DRINGFLOW_BUILD_TESTS=ON \
    -DRINGFLOW_SANITIZE="$sanitize" "${launcher[@]}" "${extra[@]}" &&
    cmake --build "$dir" -j "$JOBS" "${targets[@]}" &&
    ctest --test-dir "$dir" --output-on-failure --no-tests=error "${select[@]}" || rc=$?
  echo "run_tests: sanitizer stage $name $( ((rc == 0)) && echo passed || echo FAILED ) in $((SECONDS - t0)) s"
  return "$rc"
}

if [[ "${RINGFLOW_SANITIZERS:-1}" == 0 ]]; then
  step "sanitizer stages skipped (RINGFLOW_SANITIZERS=0)"
else
  sanitizer_stage asan address,undefined 'unit|mpi' || status=1
  sanitizer_stage tsan thread unit test_comm test_coll test_train test_pipeline test_serve || status=1
fi

step "run_tests: $( ((status == 0)) && echo passed || echo FAILED ) in $((SECONDS - started)) s"
exit "$status"
