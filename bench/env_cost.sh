#!/usr/bin/env bash
# env_cost.sh: what an environment setting costs, measured with ringflow-bench.
#
#   bench/env_cost.sh [options] CONFIG...
#
# Each CONFIG is one setting to compare with the default (no variables set):
# one or more VAR=value pairs separated by commas, e.g. RINGFLOW_FLIGHT=0 or
# RINGFLOW_CHECK=0,RINGFLOW_FLIGHT=0. The default and every CONFIG are run
# interleaved (default, config 1, config 2, default, ...) --runs times at each
# size and rank count, each run one mpirun of ringflow-bench (its own time is
# the median of 5 repetitions); the table gives the median over runs, the
# ratio of medians config/default (1.02 = 2% slower than the default) and the
# median of the run-by-run ratios ("paired", steadier on a loaded machine).
#
# Options:
#   --np "2 4"          rank counts (default "2 4")
#   --sizes "1K 64K 1M" message sizes (default "1K 64K 1M")
#   --runs N            interleaved runs per configuration (default 7)
#   --algo NAME         ringflow-bench --algo (default ring)
#   --bench PATH        ringflow-bench (default build/bin/ringflow-bench)
#   --mpirun "CMD"      mpirun command (default: mpirun --oversubscribe, plus
#                       --allow-run-as-root as root)
#
# Example (the flight recorder's cost):
#   bench/env_cost.sh RINGFLOW_FLIGHT=0
set -euo pipefail

np_list="2 4"
sizes="1K 64K 1M"
runs=7
algo=ring
bench=build/bin/ringflow-bench
mpirun_cmd="mpirun --oversubscribe"
[[ $(id -u) == 0 ]] && mpirun_cmd+=" --allow-run-as-root"
configs=()
while (($#)); do
  case "$1" in
    --np) np_list=$2; shift 2 ;;
    --sizes) sizes=$2; shift 2 ;;
    --runs) runs=$2; shift 2 ;;
    --algo) algo=$2; shift 2 ;;
    --bench) bench=$2; shift 2 ;;
    --mpirun) mpirun_cmd=$2; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
    *=*) configs+=("$1"); shift ;;
    *) echo "env_cost.sh: '$1' is neither an option nor VAR=value (see --help)" >&2; exit 2 ;;
  esac
done
if ((${#configs[@]} == 0)); then
  echo "env_cost.sh: give at least one CONFIG such as RINGFLOW_FLIGHT=0 (see --help)" >&2
  exit 2
fi
[[ -x $bench ]] || { echo "env_cost.sh: $bench is not built" >&2; exit 2; }
[[ $runs =~ ^[1-9][0-9]*$ ]] || { echo "env_cost.sh: --runs must be a positive count" >&2; exit 2; }

# Timed iterations per run: enough that one run takes a fraction of a second.
iters_for() {
  case "$1" in
    *K) local k=${1%K}; if ((k <= 4)); then echo 2000; elif ((k <= 256)); then echo 300; else echo 40; fi ;;
    *M) echo 40 ;;
    *) echo 1000 ;;
  esac
}

all=("" "${configs[@]}")  # index 0: the default
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# One run: prints the time in microseconds.
one_run() {  # config np size
  local config=$1 np=$2 size=$3
  local -a envs=()
  if [[ -n $config ]]; then IFS=, read -r -a envs <<<"$config"; fi
  local -a xs=()
  for e in "${envs[@]}"; do xs+=(-x "$e"); done
  local out
  out=$(env "${envs[@]}" timeout 300 $mpirun_cmd -np "$np" "${xs[@]}" "$bench" -b "$size" -e "$size" \
        -n "$(iters_for "$size")" -w 50 --reps 5 -c 0 --algo "$algo" --csv - 2>"$tmp/err") || {
    echo "env_cost.sh: ringflow-bench failed (${config:-default}, -np $np, $size):" >&2
    cat "$tmp/err" >&2
    exit 1
  }
  awk -F, 'NR == 2 { print $4 }' <<<"$out"
}

median() { sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

for np in $np_list; do
  for size in $sizes; do
    for ((r = 0; r < runs; ++r)); do
      for i in "${!all[@]}"; do
        one_run "${all[$i]}" "$np" "$size" >>"$tmp/t.$np.$size.$i"
      done
    done
  done
done

printf '%-4s %-6s %-36s %12s %8s %10s\n' np size config median_us ratio paired
for np in $np_list; do
  for size in $sizes; do
    base=$(median <"$tmp/t.$np.$size.0")
    for i in "${!all[@]}"; do
      m=$(median <"$tmp/t.$np.$size.$i")
      # The median of run-by-run ratios (each config against the default run
      # just before it): robust against a machine whose load drifts.
      paired=$(paste "$tmp/t.$np.$size.$i" "$tmp/t.$np.$size.0" | awk '{ print $1 / $2 }' | median)
      printf '%-4s %-6s %-36s %12.3f %8.3f %10.3f\n' "$np" "$size" "${all[$i]:-default}" "$m" \
        "$(awk -v a="$m" -v b="$base" 'BEGIN { print a / b }')" "$paired"
    done
  done
done
echo "(median over $runs interleaved runs, each the median of 5 repetitions; ratio = median(config) /"
echo " median(default); paired = median over runs of config / default of the same run)"
