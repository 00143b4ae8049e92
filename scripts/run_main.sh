#!/usr/bin/env bash
# The main job: install dependencies, build ringflow, run the MPI example, then a short benchmark table.
#
#   scripts/run_main.sh
# Environment: BUILD_DIR (default build), JOBS (default 2), NP (ranks, default 4),
# CMAKE_ARGS (extra configure flags), RINGFLOW_SKIP_DEPS=1 (no apt-get).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
BUILD_DIR=${BUILD_DIR:-build}
JOBS=${JOBS:-2}
NP=${NP:-4}
read -r -a extra_cmake_args <<<"${CMAKE_ARGS:-}"

step() { printf '\n== %s\n' "$*"; }

step "dependencies"
scripts/install_deps.sh

step "configure and build ($BUILD_DIR, -j$JOBS)"
cmake -S . -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=Release "${extra_cmake_args[@]}"
cmake --build "$BUILD_DIR" -j "$JOBS"

mpirun_cmd=(mpirun --oversubscribe -np "$NP")
if [[ "$(id -u)" == 0 ]]; then
  mpirun_cmd+=(--allow-run-as-root)  # OpenMPI refuses root without it
fi

# The demo: data-parallel Fashion-MNIST training (global batch 128 split over the
# ranks); 6 epochs reach about 0.89 test accuracy. EPOCHS overrides.
demo=("$BUILD_DIR/bin/train_fashion_mnist" --epochs "${EPOCHS:-6}")

step "demo: ${mpirun_cmd[*]} ${demo[*]}"
if [[ ! -x "${demo[0]}" ]]; then
  echo "run_main: ${demo[0]} was not built; see the build output above." >&2
  exit 1
fi
"${mpirun_cmd[@]}" "${demo[@]}"

bench=("$BUILD_DIR/bin/ringflow-bench" -b 1K -e 16M -f 8 -n 10 -w 3 --reps 3 --baseline mpi)

step "benchmark: ${mpirun_cmd[*]} ${bench[*]}"
if [[ ! -x "${bench[0]}" ]]; then
  echo "run_main: ${bench[0]} does not exist: ringflow-bench was not built (is bench/ complete" \
       "and RINGFLOW_BUILD_BENCH on?)." >&2
  exit 1
fi
"${mpirun_cmd[@]}" "${bench[@]}"

step "run_main: done"
