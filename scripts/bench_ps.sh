#!/usr/bin/env bash
# bench_ps.sh: the parameter server's consistency models against the allreduce
# trainer on Fashion-MNIST (build/bin/ps_fashion_mnist), with and without a
# slowed worker. Interleaved: each repetition runs every configuration once,
# in order, so a noisy minute hits them all; prints the median samples/s and
# test accuracy of each, and writes every run to $OUT (CSV).
#
#   scripts/bench_ps.sh                      # NP=4 REPS=3 STEPS=200
#   NP=4 REPS=5 SLOW_RANK=3 SLOWDOWN=3 scripts/bench_ps.sh
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${BUILD_DIR:-build}
NP=${NP:-4}
REPS=${REPS:-3}
STEPS=${STEPS:-200}
SLOW_RANK=${SLOW_RANK:-$((NP - 1))}
SLOWDOWN=${SLOWDOWN:-3}
OUT=${OUT:-ps_bench.csv}
BIN=$BUILD_DIR/bin/ps_fashion_mnist
MPIRUN=(mpirun --oversubscribe -np "$NP")
[ "$(id -u)" = 0 ] && MPIRUN=(mpirun --allow-run-as-root --oversubscribe -np "$NP")

# name|flags
CONFIGS=(
  "allreduce|--mode allreduce"
  "sync S=1|--mode sync --servers 1"
  "async S=1|--mode async --servers 1"
  "ssp s=1 S=1|--mode ssp --staleness 1 --servers 1"
  "ssp s=2 S=1|--mode ssp --staleness 2 --servers 1"
  "local H=4|--mode local --local-steps 4 --servers 0"
)

echo "config,slowed,rep,samples_per_s,test_accuracy,bytes_per_sample" > "$OUT"
for rep in $(seq 1 "$REPS"); do
  for slowed in no yes; do
    for c in "${CONFIGS[@]}"; do
      name=${c%%|*}
      flags=${c#*|}
      extra=""
      [ "$slowed" = yes ] && extra="--slow-worker $SLOW_RANK --slowdown $SLOWDOWN"
      # shellcheck disable=SC2086
      line=$("${MPIRUN[@]}" "$BIN" $flags --steps "$STEPS" $extra | tail -2 | tr '\n' ' ')
      sps=$(sed -n 's/.*samples_per_s=\([0-9.]*\).*/\1/p' <<<"$line")
      bps=$(sed -n 's/.*bytes_per_sample=\([0-9.]*\).*/\1/p' <<<"$line")
      acc=$(sed -n 's/.*test_accuracy=\([0-9.]*\).*/\1/p' <<<"$line")
      echo "$name,$slowed,$rep,$sps,$acc,$bps" >> "$OUT"
      echo "rep $rep slowed=$slowed $name: samples/s $sps accuracy $acc bytes/sample $bps" >&2
    done
  done
done

# Medians per (config, slowed).
echo
echo "| config | slowed worker | samples/s (median of $REPS) | test accuracy (median) | bytes sent per sample |"
echo "| --- | --- | ---: | ---: | ---: |"
for slowed in no yes; do
  for c in "${CONFIGS[@]}"; do
    name=${c%%|*}
    med() {
      awk -F, -v n="$name" -v s="$slowed" -v k="$1" '$1==n && $2==s {print $k}' "$OUT" | sort -g |
        awk '{a[NR]=$1} END {if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'
    }
    label=$([ "$slowed" = yes ] && echo "rank $SLOW_RANK x$SLOWDOWN" || echo "none")
    echo "| $name | $label | $(med 4) | $(med 5) | $(med 6) |"
  done
done
