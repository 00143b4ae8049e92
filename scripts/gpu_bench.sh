#!/usr/bin/env bash
# GPU benchmarks on a GPU machine: gpu-kernel-bench (our fused compression
# kernels against a device-to-device copy, C++ only), gpu-staged-bench (the
# staged MPI path against copy + allreduce + copy, -np 2 and -np 4 sharing the
# GPU), then bench/gpu/compare_torch.py (the same kernels against PyTorch eager and
# torch.compile, in one interleaved run). The comparison table is printed last.
#
#   scripts/gpu_bench.sh [BUILD_DIR]   (default build-gpu; a directory with
#                                       bin/ and lib/, e.g. gpu-prebuilt, works too)
# Environment:
#   OUT                 write $OUT/gpu_bench.json and $OUT/gpu_bench.md (the table
#                       of docs/gpu.md); just these two files (the device tool
#                       returns few), the rest is this script's output
#   BENCH_ARGS          extra compare_torch.py arguments (e.g. "--reps 20")
#   KERNEL_BENCH_ARGS   extra gpu-kernel-bench arguments
#   STAGED_BENCH_ARGS   extra gpu-staged-bench arguments (e.g. "--reps 11")
#   PYTHON              the Python with PyTorch (python3)
# Exit status: 0 when all ran and compare_torch found no mismatch; 77 when
# there is no GPU; otherwise the first failing step's status.
set -uo pipefail
B=build-gpu
[[ $# -ge 1 ]] && B=$(realpath -m "$1")  # relative to the caller's directory
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
PY=${PYTHON:-python3}
started=$SECONDS
[[ -n ${OUT:-} ]] && mkdir -p "$OUT"

kb=$B/bin/gpu-kernel-bench
[[ ! -x $kb && -x $B/gpu-kernel-bench ]] && kb=$B/gpu-kernel-bench
sb=$B/bin/gpu-staged-bench
[[ ! -x $sb && -x $B/gpu-staged-bench ]] && sb=$B/gpu-staged-bench
lib=$B/lib/libringflow_gpu_bench.so

describe() {  # rc -> words
  case $1 in
    0) echo "ok" ;;
    77) echo "skipped: no GPU" ;;
    124) echo "TIMED OUT" ;;
    *) echo "FAILED (rc=$1)" ;;
  esac
}

echo "== gpu-kernel-bench ($kb)"
if [[ -x $kb ]]; then
  # shellcheck disable=SC2086  # KERNEL_BENCH_ARGS is a list of words
  timeout 90 "$kb" ${KERNEL_BENCH_ARGS:-} 2>&1
  kb_rc=$?
else
  echo "not built: $kb is missing (target gpu-kernel-bench; needs RINGFLOW_WITH_CUDA=ON)"
  kb_rc=127
fi
echo "gpu-kernel-bench: $(describe "$kb_rc")"
echo

# The staged MPI path, ranks sharing the GPU. 1 to 64 MiB per rank, 7 x 3
# calls of each of the four variants per size: about 5 to 10 s a run.
sb_rc=()
for np in 2 4; do
  echo "== gpu-staged-bench -np $np ($sb)"
  if [[ -x $sb ]]; then
    # shellcheck disable=SC2086  # STAGED_BENCH_ARGS is a list of words
    timeout 60 mpirun --allow-run-as-root --oversubscribe --bind-to none -np "$np" \
      "$sb" -b 1M -e 64M -f 4 --reps 7 --iters 3 ${STAGED_BENCH_ARGS:-} 2>&1
    rc=$?
  else
    echo "not built: $sb is missing (target gpu-staged-bench; needs RINGFLOW_WITH_CUDA=ON)"
    rc=127
  fi
  echo "gpu-staged-bench -np $np: $(describe "$rc")"
  echo
  sb_rc+=("$rc")
done

echo "== compare_torch.py (library $lib)"
json=()
[[ -n ${OUT:-} ]] && json=(--json "$OUT/gpu_bench.json" --markdown "$OUT/gpu_bench.md")
lib_arg=(--lib "$lib")
[[ -f $lib ]] || { echo "note: $lib is missing: PyTorch rows only"; lib_arg=(--no-ours); }
# PyTorch brings its own CUDA libraries; a toolkit directory put first on
# LD_LIBRARY_PATH (as gpu_check.sh does for prebuilt binaries) can shadow them.
# If torch does not import with it but does without, run without it.
py_env=()
if [[ -n ${LD_LIBRARY_PATH:-} ]] && ! "$PY" -c "import torch" >/dev/null 2>&1 &&
  env -u LD_LIBRARY_PATH "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "note: torch imports only without LD_LIBRARY_PATH=$LD_LIBRARY_PATH: running it without"
  py_env=(env -u LD_LIBRARY_PATH)
fi
out_file=$(mktemp)
trap 'rm -f "$out_file"' EXIT
# The budget (140 s) stops compiles and repetitions before this timeout.
# shellcheck disable=SC2086  # BENCH_ARGS is a list of words
timeout 200 "${py_env[@]}" "$PY" -u bench/gpu/compare_torch.py "${lib_arg[@]}" "${json[@]}" ${BENCH_ARGS:-} 2>&1 |
  tee "$out_file"
ct_rc=${PIPESTATUS[0]}
case $ct_rc in
  1) ct_words="ran; some check MISMATCH or a call failed (see above)" ;;
  3) ct_words="skipped: PyTorch is not importable by $PY" ;;
  *) ct_words=$(describe "$ct_rc") ;;
esac

# Summary, then the comparison table again, so that it is the last thing printed.
echo
echo "== gpu_bench ($((SECONDS - started)) s): gpu-kernel-bench $(describe "$kb_rc");" \
  "gpu-staged-bench -np 2 $(describe "${sb_rc[0]}"), -np 4 $(describe "${sb_rc[1]}");" \
  "compare_torch $ct_words"
if grep -q "^== compare_torch:" "$out_file"; then
  sed -n '/^== compare_torch:/,$p' "$out_file"
fi

for rc in "$kb_rc" "${sb_rc[@]}" "$ct_rc"; do
  [[ $rc != 0 ]] && exit "$rc"
done
exit 0
