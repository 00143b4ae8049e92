#!/usr/bin/env bash
# GPU check for a lent GPU machine: build with CUDA (Catch2 v3 there), run the
# cuda-labelled tests and the whole suite, then print a short table last.
#
#   scripts/gpu_check.sh            (no package installs: the GPU machine has no registry)
# Writes logs to $OUT when set (the device tool's output folder).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
BUILD_DIR=${BUILD_DIR:-build-gpu}
LOG=${OUT:-/tmp}/gpu_check.log
: >"$LOG"
JOBS=${JOBS:-$(nproc)}

gpu=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1)
echo "GPU: ${gpu:-none}" | tee -a "$LOG"

t0=$(date +%s)
cmake -S . -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=Release -DRINGFLOW_WITH_CUDA=ON >>"$LOG" 2>&1
cfg=$?
cmake --build "$BUILD_DIR" -j "$JOBS" >>"$LOG" 2>&1
bld=$?
t1=$(date +%s)
warnings=$(grep -c "warning:" "$LOG" || true)

run_ctest() {  # label-or-regex, name
  local out
  out=$(ctest --test-dir "$BUILD_DIR" "$@" --output-on-failure 2>&1)
  echo "$out" >>"$LOG"
  echo "$out" | grep -E "tests passed|tests failed" | tail -1
}
cuda_res=$(run_ctest -L cuda)
all_res=$(run_ctest -LE cuda)

# Single-process training smoke on the GPU host's CPU (proves the example
# links and runs with g++ 13 / Catch2 v3 / OpenMPI 4.1.6).
train_res=$(mpirun --allow-run-as-root --oversubscribe -np 4 "$BUILD_DIR/bin/train_fashion_mnist" \
  --epochs 1 --data-dir "${DATA_DIR:-/usr/share/datasets/fashion-mnist}" 2>>"$LOG" | tail -1)

echo
echo "== gpu_check summary"
printf '%-22s %s\n' "gpu" "${gpu:-none}"
printf '%-22s %s\n' "configure/build rc" "$cfg/$bld ($((t1 - t0)) s, $warnings warnings)"
printf '%-22s %s\n' "cuda tests" "${cuda_res:-none}"
printf '%-22s %s\n' "other tests" "${all_res:-none}"
printf '%-22s %s\n' "train -np 4, 1 epoch" "${train_res:-not run}"
[[ $cfg == 0 && $bld == 0 ]]
