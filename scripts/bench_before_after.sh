#!/usr/bin/env bash
# Interleaved before/after comparison of two ringflow-bench binaries (say, the
# tree before a change and after it): `--algo all` at -np NP, the two
# alternating run by run, ROUNDS times; prints per algorithm and size the
# ratio after/before of the medians over the rounds (below 1: after is
# faster). MPI_Allreduce's row is the same code in both: its spread is the
# noise floor.
#
#   scripts/bench_before_after.sh BEFORE_BENCH AFTER_BENCH
# Environment: NP (default 2), ROUNDS (default 7), OUT (folder for the CSVs,
# default a temporary one), BENCH_ARGS (default "-b 1K -e 16M -f 4 -n 10 -w 3 --reps 3").
set -euo pipefail
if (($# != 2)); then
  echo "usage: $0 BEFORE_BENCH AFTER_BENCH" >&2
  exit 2
fi
before=$1 after=$2
NP=${NP:-2}
ROUNDS=${ROUNDS:-7}
OUT=${OUT:-$(mktemp -d)}
read -r -a args <<<"${BENCH_ARGS:--b 1K -e 16M -f 4 -n 10 -w 3 --reps 3}"
mpi=(mpirun --oversubscribe -np "$NP")
[[ $(id -u) == 0 ]] && mpi+=(--allow-run-as-root)
for ((r = 1; r <= ROUNDS; ++r)); do
  for v in before after; do
    exe=$before
    [[ $v == after ]] && exe=$after
    "${mpi[@]}" "$exe" --algo all --no-gloo "${args[@]}" --csv "$OUT/$v.$r.csv" >"$OUT/$v.$r.log" 2>&1
  done
  echo "round $r of $ROUNDS done ($(date +%T))" >&2
done
python3 - "$OUT" <<'PY'
import collections, csv, glob, statistics as st, sys
out = sys.argv[1]
d = collections.defaultdict(lambda: {"before": [], "after": []})
for v in ("before", "after"):
    for f in glob.glob(f"{out}/{v}.*.csv"):
        for row in csv.DictReader(l for l in open(f) if not l.startswith("#")):
            d[(row["algo"], int(row["bytes"]))][v].append(float(row["median_us"]))
algos = sorted({a for a, _ in d})
sizes = sorted({b for _, b in d})
def label(b):
    return f"{b >> 20}M" if b >= 1 << 20 else f"{b >> 10}K" if b >= 1024 else f"{b}"
print("| algorithm | " + " | ".join(label(s) for s in sizes) + " |")
print("|---" * (len(sizes) + 1) + "|")
ratios = []
for a in algos:
    cells = []
    for s in sizes:
        x = d.get((a, s))
        if not x or not x["before"] or not x["after"]:
            cells.append("-")
            continue
        r = st.median(x["after"]) / st.median(x["before"])
        ratios.append(r)
        cells.append(f"{r:.3f}")
    print(f"| {a} | " + " | ".join(cells) + " |")
print(f"\nafter/before over {len(ratios)} cells: median {st.median(ratios):.3f}, "
      f"min {min(ratios):.3f}, max {max(ratios):.3f}")
PY
