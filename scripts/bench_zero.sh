#!/usr/bin/env bash
# Interleaved samples/s of train_fashion_mnist --zero 0, 1, 2, 3 (a benchmark, not a test).
#   scripts/bench_zero.sh [build/bin/train_fashion_mnist] [rounds]
# Prints one line per run: np hidden zero samples/s, then the memory line of rank 0.
set -euo pipefail
bin=${1:-build/bin/train_fashion_mnist}
rounds=${2:-3}
run() {  # np hidden limit zero
  out=$(mpirun --allow-run-as-root --oversubscribe -np "$1" "$bin" --epochs 1 --limit "$3" \
        --hidden "$2" --zero "$4" --algo ring --progress none 2>&1)
  sps=$(grep -o 'done: .*, \([0-9]*\) samples/s' <<<"$out" | grep -o '[0-9]* samples/s' | cut -d' ' -f1)
  mem=$(grep 'memory per rank' <<<"$out")
  echo "np=$1 hidden=$2 zero=$4 samples_per_s=$sps | $mem"
}
for r in $(seq "$rounds"); do
  for np in 2 4; do
    for z in 0 1 2 3; do run "$np" 256,128 8000 "$z"; done
    for z in 0 1 2 3; do run "$np" 4096,4096 512 "$z"; done
  done
done
