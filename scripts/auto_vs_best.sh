#!/usr/bin/env bash
# algo::automatic against the best fixed algorithm on a machine without a
# tuning table: RUNS runs of `ringflow-bench --algo all` per rank count
# (each run interleaves every algorithm and auto at every size), then per
# size the median over runs of auto/best, the worst run, and what auto
# picked in each run, and what auto's first-use trials cost there (median
# over runs: calls, ms on rank 0). Issue 13's criterion: median <= 1.10 at
# every size.
# Up to 256 KiB each run times 21 reps (SMALL_REPS) instead of the default 5:
# a call takes 20-80 us there, 5 reps of 20 calls are 2-8 ms per algorithm,
# and on 2 shared cores that is too short a sample for one noisy median to
# be compared with the minimum over eight others (the best is the luckiest
# of them). The larger sizes keep 5 reps (a 64 MiB rep takes seconds).
#   RUNS=3 NPS="2 4" MIN=1K MAX=64M SMALL_REPS=21 BUILD_DIR=build scripts/auto_vs_best.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
runs=${RUNS:-3}; nps=${NPS:-"2 4"}; min=${MIN:-1K}; max=${MAX:-64M}; small_reps=${SMALL_REPS:-21}
to_bytes() { python3 -c 'import sys; s=sys.argv[1]; m={"K":1<<10,"M":1<<20,"G":1<<30}; print(int(s[:-1])*m[s[-1]] if s[-1] in m else int(s))' "$1"; }
split=$((256 << 10))
min_b=$(to_bytes "$min"); max_b=$(to_bytes "$max")
# The bench steps sizes by 4x from -b: the large part starts at the first
# size of that grid past 256 KiB.
large_b=$min_b
while ((large_b <= split)); do large_b=$((large_b * 4)); done
bin=${BUILD_DIR:-build}/bin/ringflow-bench
[[ -x $bin ]] || { echo "auto_vs_best: $bin not built" >&2; exit 1; }
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for ((r = 1; r <= runs; ++r)); do
  for np in $nps; do
    bench() {
      RINGFLOW_TUNING=off mpirun --allow-run-as-root --oversubscribe -np "$np" -x RINGFLOW_TUNING \
        "$bin" --algo all --no-gloo "$@" >/dev/null
    }
    if ((min_b <= split)); then
      bench -b "$min_b" -e "$((max_b < split ? max_b : split))" --reps "$small_reps" \
        --csv "$out/np$np.run$r.small.csv"
    fi
    if ((max_b >= large_b)); then
      bench -b "$large_b" -e "$max_b" --csv "$out/np$np.run$r.large.csv"
    fi
  done
done
echo "# $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores; $runs runs of ringflow-bench --algo all --no-gloo -b $min -e $max (--reps $small_reps up to 256K), RINGFLOW_TUNING=off"
python3 - "$out" "$runs" $nps <<'PY'
import csv, statistics, sys, os
d, runs, nps = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
def human(b):
    for unit, s in (("M", 1 << 20), ("K", 1 << 10)):
        if b >= s and b % s == 0: return f"{b // s}{unit}"
    return str(b)
for np in nps:
    per = {}  # bytes -> list of (ratio, auto pick, best, from, first-use calls)
    for r in range(1, runs + 1):
        rows = []
        for part in ("small", "large"):
            f = os.path.join(d, f"np{np}.run{r}.{part}.csv")
            if os.path.exists(f): rows += list(csv.DictReader(open(f)))
        by = {}
        for row in rows: by.setdefault(int(row["bytes"]), []).append(row)
        for b, rs in by.items():
            fixed = [x for x in rs if x["algo"] not in ("auto", "mpi") and not x["algo"].startswith("gloo") and x["wrong"] == "0"]
            best = min(fixed, key=lambda x: float(x["median_us"]))
            auto = next(x for x in rs if x["algo"] == "auto")
            per.setdefault(b, []).append((float(auto["median_us"]) / float(best["median_us"]),
                                          auto["auto_choice"], best["algo"], auto["auto_from"],
                                          int(auto.get("first_use_calls") or 0),
                                          float(auto.get("first_use_ms") or 0)))
    print(f"\n-np {np}")
    print(f"{'size':>6} {'auto/best median':>16} {'worst':>6} {'first use':>18}  picks (best) per run")
    ok = 0
    for b in sorted(per):
        v = per[b]
        med = statistics.median(x[0] for x in v)
        ok += med <= 1.10
        picks = ", ".join(f"{x[1]} ({x[2]})" for x in v)
        fu = f"{statistics.median(x[4] for x in v):.0f} calls {statistics.median(x[5] for x in v):.1f} ms"
        print(f"{human(b):>6} {med:16.3f} {max(x[0] for x in v):6.3f} {fu:>18}  {picks}")
    print(f"median auto/best <= 1.10 at {ok} of {len(per)} sizes")
PY
