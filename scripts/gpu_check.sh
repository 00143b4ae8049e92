#!/usr/bin/env bash
# GPU check for a lent GPU machine (one H100/H200; no package registry there).
# Runs the cuda tests (GPU against the CPU reference), the NCCL tests at -np 1,
# the staged MPI path at -np 2 and -np 4 sharing the GPU, and the GPU
# benchmarks (our kernels against a device copy and PyTorch eager/compiled),
# then prints a short table last.
#
#   scripts/gpu_check.sh                 build on the GPU machine, then test
#   PREBUILT=gpu-prebuilt scripts/gpu_check.sh
#                                        use binaries built here by
#                                        scripts/gpu_prebuild.sh (saves the
#                                        build minutes of a short device lease)
#                                        and build natively in the background
#                                        only to check that g++ 13/Catch2 v3 compile it
# Environment: OUT (logs and JSON land there; the device tool's output
# folder), JOBS, SKIP_BENCH=1, SKIP_NATIVE_BUILD=1, BENCH_ARGS (passed to
# compare_torch.py through scripts/gpu_bench.sh).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-/tmp/ringflow-gpu-check}
mkdir -p "$OUT"
LOG=$OUT/gpu_check.log
: >"$LOG"
# Per-step logs go to LOGDIR and come back as one $OUT/logs.tgz (the device
# tool returns at most 8 files).
LOGDIR=${LOGDIR:-/tmp/ringflow-gpu-logs}
rm -rf "$LOGDIR" && mkdir -p "$LOGDIR"
trap 'tar czf "$OUT/logs.tgz" -C "$(dirname "$LOGDIR")" "$(basename "$LOGDIR")" 2>/dev/null' EXIT
# The toolkit's runtime and NCCL wherever this machine keeps them (prebuilt
# binaries were linked against /usr/local/cuda/lib on the build machine).
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/cuda/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
JOBS=${JOBS:-$(nproc)}
export RINGFLOW_TIMEOUT=${RINGFLOW_TIMEOUT:-60}
started=$SECONDS

say() { printf '%s\n' "$*" | tee -a "$LOG"; }
gpu=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1)
say "GPU: ${gpu:-none}"
say "nvcc: $(nvcc --version 2>/dev/null | tail -1)"
say "torch: $(python3 -c 'import torch; print(torch.__version__, torch.cuda.is_available())' 2>/dev/null)"

native_build() {  # dir -> configure + build the GPU targets; rc in $dir.rc
  local dir=$1
  {
    cmake -S . -B "$dir" -DCMAKE_BUILD_TYPE=Release -DRINGFLOW_WITH_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
      -DRINGFLOW_BUILD_TESTS=ON &&
      cmake --build "$dir" -j "$JOBS" --target ringflow ringflow_cuda test_cuda test_cuda_mpi \
        $(grep -qs "gpu-kernel-bench" bench/gpu/CMakeLists.txt && echo gpu-kernel-bench ringflow_gpu_bench) \
        $(grep -qs "gpu-staged-bench" bench/gpu/CMakeLists.txt && echo gpu-staged-bench)
  } >"$LOGDIR/native_build.log" 2>&1
  echo $? >"$dir.rc"
}

# Which binaries: carried prebuilt ones if they load here, else a native build.
B=""
native_bg=""
if [[ -n "${PREBUILT:-}" && -x "${PREBUILT}/tests/test_cuda" ]]; then
  if ldd "$PREBUILT/tests/test_cuda" "$PREBUILT/tests/test_cuda_mpi" 2>&1 | grep -q "not found"; then
    say "prebuilt binaries miss libraries here:"
    ldd "$PREBUILT/tests/test_cuda" 2>&1 | grep "not found" | tee -a "$LOG"
  else
    B=$PREBUILT
    say "using prebuilt binaries from $B"
  fi
fi
t_build=0
if [[ -z "$B" ]]; then
  t0=$SECONDS
  native_build build-gpu
  t_build=$((SECONDS - t0))
  B=build-gpu
  say "native build rc=$(cat build-gpu.rc) in ${t_build} s"
elif [[ -z "${SKIP_NATIVE_BUILD:-}" ]]; then
  # Checks that the tree compiles with this machine's g++ 13 and Catch2 v3,
  # at low priority beside the tests (which need few CPU cores).
  (
    renice -n 19 "$BASHPID" >/dev/null 2>&1
    JOBS=$((JOBS > 4 ? JOBS - 4 : 2))
    native_build build-gpu-native
  ) &
  native_bg=$!
fi
# Tests and binaries take their own paths from argv[0]; the build tree's
# absolute paths from another machine do not matter.
BIN=$B/bin
[[ -d $BIN ]] || BIN=$B

catch_summary() {  # log -> "N passed / M failed" from Catch2's last summary line
  local line
  line=$(sed 's/\x1b\[[0-9;]*m//g' "$1" | grep -E "^(All tests passed|test cases:)" | tail -1)
  if [[ $line == "All tests passed"* ]]; then
    echo "$line" | sed -E 's/All tests passed \(([0-9]+) assertions? in ([0-9]+) test cases?\)/\2 cases passed (\1 assertions)/'
  elif [[ -n $line ]]; then
    echo "$line"
  else
    echo "no summary (see log)"
  fi
}

results=()
failures=()
run_step() {  # name, timeout, command...
  local name=$1 limit=$2
  shift 2
  local log="$LOGDIR/${name// /_}.log" t0=$SECONDS rc
  timeout "$limit" "$@" >"$log" 2>&1
  rc=$?
  local what
  what=$(catch_summary "$log")
  [[ $rc == 124 ]] && what="TIMED OUT after ${limit} s"
  results+=("$(printf '%-26s rc=%-3s %4d s  %s' "$name" "$rc" $((SECONDS - t0)) "$what")")
  say "${results[-1]}"
  if [[ $rc != 0 && $rc != 77 ]]; then
    failures+=("--- $name (rc=$rc): first failure lines")
    failures+=("$(sed 's/\x1b\[[0-9;]*m//g' "$log" | grep -E -A3 "FAILED|with expansion|error|Error|what\(\)|due to unexpected" | head -30)")
  fi
}

MPIRUN=(mpirun --allow-run-as-root --oversubscribe --bind-to none)
run_step "cuda tests (1 process)" 240 "$B/tests/test_cuda"
for np in 1 2 4; do
  run_step "cuda mpi tests -np $np" 180 "${MPIRUN[@]}" -np "$np" "$B/tests/test_cuda_mpi"
done

bench_table=""
if [[ -z "${SKIP_BENCH:-}" && -x scripts/gpu_bench.sh ]]; then
  t0=$SECONDS
  timeout 300 scripts/gpu_bench.sh "$B" >"$LOGDIR/gpu_bench.log" 2>&1
  rc=$?
  results+=("$(printf '%-26s rc=%-3s %4d s' "gpu benchmarks" "$rc" $((SECONDS - t0)))")
  say "${results[-1]}"
  bench_table=$(tail -25 "$LOGDIR/gpu_bench.log")
fi

native=""
if [[ -n $native_bg ]]; then
  # Give the background build at most NATIVE_WAIT (30) s more; report what it got to.
  for _ in $(seq "${NATIVE_WAIT:-30}"); do kill -0 "$native_bg" 2>/dev/null || break; sleep 1; done
  if kill -0 "$native_bg" 2>/dev/null; then
    native="still building after the tests (not waited for)"
    kill -- -"$native_bg" 2>/dev/null
  else
    native="rc=$(cat build-gpu-native.rc 2>/dev/null), $(grep -c 'warning:' "$LOGDIR/native_build.log") warnings"
  fi
  grep -E "error|warning:" "$LOGDIR/native_build.log" | head -20 >>"$LOG"
fi

if ((${#failures[@]})); then
  echo
  printf '%s\n' "${failures[@]}"
fi
echo
echo "== gpu_check summary ($((SECONDS - started)) s)"
printf '%-26s %s\n' "gpu" "${gpu:-none}"
printf '%-26s %s\n' "binaries" "$B$([[ $t_build != 0 ]] && echo " (native build ${t_build} s, rc=$(cat build-gpu.rc))")"
[[ -n $native ]] && printf '%-26s %s\n' "native g++13 build" "$native"
printf '%s\n' "${results[@]}"
if [[ -n $bench_table ]]; then
  echo
  echo "$bench_table"
fi
