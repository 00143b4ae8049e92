#!/usr/bin/env bash
# The autodiff's training step against PyTorch's, interleaved: for each
# repetition and thread count, build/bin/ad_step_bench then
# bench/torch/step_bench.py (same model, batch, loss, AdamW); prints the
# medians and ringflow / PyTorch ratios (above 1: ringflow faster).
#   REPS=5 THREADS="1 2" MODELS="mlp" BATCH=128 STEPS=300 BUILD_DIR=build scripts/bench_torch.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
reps=${REPS:-5}; threads=${THREADS:-"1 2"}; models=${MODELS:-mlp}
batch=${BATCH:-128}; steps=${STEPS:-300}; build=${BUILD_DIR:-build}
py=$(scripts/torch_venv.sh | tail -1)
bin=$build/bin/ad_step_bench
[[ -x $bin ]] || { echo "bench_torch: $bin not built (cmake --build $build --target ad_step_bench)" >&2; exit 1; }
out=$(mktemp)
for ((r = 1; r <= reps; ++r)); do
  for m in $models; do
    for t in $threads; do
      args=(--model "$m" --threads "$t" --batch "$batch" --steps "$steps")
      echo "ringflow $("$bin" "${args[@]}")" >>"$out"
      echo "torch $("$py" bench/torch/step_bench.py "${args[@]}")" >>"$out"
    done
  done
done
echo "# $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores; batch $batch, $steps steps, $reps interleaved repetitions"
grep -m1 '^ringflow' "$out" | sed 's/.*backend=/# ringflow products: /'
grep -m1 '^torch' "$out" | sed 's/.*backend=/# peer: /'
python3 - "$out" <<'PY'
import re, statistics, sys
runs = {}
for line in open(sys.argv[1]):
    who = line.split()[0]
    f = dict(re.findall(r"(\w+)=(\S+)", line))
    runs.setdefault((f["model"], int(f["threads"])), {}).setdefault(who, []).append(float(f["samples_per_s"]))
print(f"{'model':6} {'threads':>7} {'ringflow samples/s':>19} {'torch samples/s':>16} {'ratio':>6}  (min..max ratio)")
for (m, t), v in sorted(runs.items()):
    a, b = v["ringflow"], v["torch"]
    ratios = [x / y for x, y in zip(a, b)]
    print(f"{m:6} {t:7d} {statistics.median(a):19.0f} {statistics.median(b):16.0f} "
          f"{statistics.median(a) / statistics.median(b):6.2f}  ({min(ratios):.2f}..{max(ratios):.2f})")
PY
rm -f "$out"
