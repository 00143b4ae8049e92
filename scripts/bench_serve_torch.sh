#!/usr/bin/env bash
# Inference against PyTorch, interleaved: for each repetition,
# build/bin/serve_bench (ringflow's fp32 and int8 model files) then
# bench/torch/serve_bench.py (the same fp32 weights, fp32 and
# quantize_dynamic int8), one thread each; prints the medians and the
# ringflow / PyTorch ratios of batch latency (above 1: ringflow faster).
# Needs the model files of `serve_fashion_mnist --model-dir DIR`.
#   REPS=5 BATCH=128 ITERS=200 MODEL_DIR=serve-models BUILD_DIR=build scripts/bench_serve_torch.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
reps=${REPS:-5}; batch=${BATCH:-128}; iters=${ITERS:-200}
dir=${MODEL_DIR:-serve-models}; build=${BUILD_DIR:-build}
py=${TORCH_PYTHON:-$(scripts/torch_venv.sh | tail -1)}
bin=$build/bin/serve_bench
[[ -x $bin ]] || { echo "bench_serve_torch: $bin not built (cmake --build $build --target serve_bench)" >&2; exit 1; }
out=$(mktemp)
for ((r = 1; r <= reps; ++r)); do
  "$bin" --model-dir "$dir" --models fp32,int8 --batch "$batch" --iters "$iters" | sed 's/^/ringflow /' >>"$out"
  "$py" bench/torch/serve_bench.py --model-dir "$dir" --batch "$batch" --iters "$iters" | sed 's/^/torch /' >>"$out"
done
echo "# $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores; batch $batch, $iters forwards x 5 rounds per run, $reps interleaved runs; load: $(uptime | sed 's/.*load average: //')"
grep -m1 '^torch' "$out" | sed 's/.*engine=/# peer: quantized engine /'
python3 - "$out" <<'PY'
import re, statistics, sys
runs = {}
for line in open(sys.argv[1]):
    who = line.split()[0]
    f = dict(re.findall(r"(\w+)=(\S+)", line))
    runs.setdefault(f["model"], {}).setdefault(who, []).append((float(f["ms"]), float(f["accuracy"])))
print(f"{'model':6} {'ringflow ms':>12} {'torch ms':>9} {'ratio':>6} {'(min..max)':>12} {'ringflow acc':>13} {'torch acc':>10}")
for m, v in runs.items():
    a, b = [x for x, _ in v["ringflow"]], [x for x, _ in v["torch"]]
    ratios = [y / x for x, y in zip(a, b)]
    print(f"{m:6} {statistics.median(a):12.4f} {statistics.median(b):9.4f} {statistics.median(b) / statistics.median(a):6.2f} "
          f"({min(ratios):.2f}..{max(ratios):.2f}) {v['ringflow'][0][1]:13.4f} {v['torch'][0][1]:10.4f}")
PY
rm -f "$out"
