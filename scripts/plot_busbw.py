#!/usr/bin/env python3
"""plot_busbw.py: draw busbw against message size for every algorithm and peer of a ringflow-bench CSV into a PNG.

Reads the CSV of `ringflow-bench --algo all --csv FILE` (columns bytes, algo,
ranks, median_us, min_us, max_us, busbw_GBs, ...) or of a single-algorithm run
with `--baseline mpi` (bytes, algo, ranks, busbw_GBs, baseline_busbw_GBs).
Lines are the median busbw; --band shades the busbw of the slowest to the
fastest repetition (max_us .. min_us) to show the noise. Needs matplotlib
(python3 -m venv .venv && .venv/bin/pip install matplotlib).

  .venv/bin/python scripts/plot_busbw.py np4.csv -o docs/img/busbw_np4.png \\
      --machine "2-vCPU AMD EPYC VM, Open MPI 4.1.4, Gloo 0.5.0"
"""
import argparse
import csv
import math
import sys
from collections import defaultdict

# ringflow's algorithms solid, MPI dashed black, Gloo dotted.
STYLE = {
    "mpi": dict(color="black", linestyle="--", marker="s"),
    "gloo_ring": dict(color="tab:cyan", linestyle=":", marker="v"),
    "gloo_ring_chunked": dict(color="tab:pink", linestyle=":", marker="^"),
    "gloo_halv_dbl": dict(color="tab:olive", linestyle=":", marker="D"),
}


def human(b):
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if b >= 1 << shift:
            return f"{b >> shift}{unit}"
    return str(b)


def read(path):
    """Returns (series, ranks): series[algo] = sorted [(bytes, busbw, lo, hi)]."""
    series = defaultdict(list)
    ranks = set()
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(line for line in f if not line.startswith("#"))]
    if not rows or "busbw_GBs" not in rows[0] or "bytes" not in rows[0]:
        sys.exit(f"plot_busbw.py: {path} is not a ringflow-bench CSV (no bytes/busbw_GBs columns)")
    for r in rows:
        b = int(r["bytes"])
        bw = float(r["busbw_GBs"])
        ranks.add(r.get("ranks", "?"))
        # The --algo all CSV rounds busbw to 1 MB/s; recompute it from the
        # median time (allreduce: factor 2(n-1)/n) so slow peers do not read 0.
        if r.get("median_us") and r.get("ranks", "").isdigit() and float(r["median_us"]) > 0:
            n = int(r["ranks"])
            bw = b / float(r["median_us"]) / 1e3 * (2 * (n - 1) / n if n > 1 else 1)
        lo = hi = bw
        if r.get("min_us") and r.get("max_us") and r.get("median_us"):
            med, tmin, tmax = float(r["median_us"]), float(r["min_us"]), float(r["max_us"])
            if med > 0 and tmin > 0 and tmax > 0:
                lo, hi = bw * med / tmax, bw * med / tmin
        series[r["algo"]].append((b, bw, lo, hi))
        if r.get("baseline_busbw_GBs"):
            mb = float(r["baseline_busbw_GBs"])
            series["mpi"].append((b, mb, mb, mb))
    for v in series.values():
        v.sort()
    return series, ranks


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv", help="ringflow-bench CSV")
    ap.add_argument("-o", "--output", required=True, help="PNG to write")
    ap.add_argument("--machine", required=True, help="the machine, named in the title")
    ap.add_argument("--title", default="ringflow-bench allreduce", help="title before the machine")
    ap.add_argument("--band", action="store_true", help="shade each series' min..max band")
    args = ap.parse_args()

    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("plot_busbw.py: needs matplotlib: python3 -m venv .venv && "
                 ".venv/bin/pip install matplotlib, then run it with .venv/bin/python")

    series, ranks = read(args.csv)
    fig, ax = plt.subplots(figsize=(10, 6), dpi=120)
    palette = iter(plt.rcParams["axes.prop_cycle"].by_key()["color"] * 3)
    all_bytes = set()
    for name, pts in series.items():
        style = STYLE.get(name)
        if style is None:
            style = dict(color=next(palette), linestyle="-", marker="o")
        xs = [p[0] for p in pts]
        all_bytes.update(xs)
        ax.plot(xs, [p[1] for p in pts], label=name, linewidth=1.6, markersize=4, **style)
        if args.band:
            ax.fill_between(xs, [p[2] for p in pts], [p[3] for p in pts], color=style["color"],
                            alpha=0.08, linewidth=0)
    ax.set_xscale("log", base=2)
    ticks = sorted(all_bytes)
    ax.set_xticks(ticks)
    ax.set_xticklabels([human(b) for b in ticks])
    ax.set_yscale("log")
    ax.set_xlabel("message size (bytes, log2)")
    ax.set_ylabel("busbw (GB/s, median of reps)" + ("; band: min..max rep" if args.band else ""))
    n = ",".join(sorted(ranks))
    ax.set_title(f"{args.title}, {n} ranks\n{args.machine}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=2, loc="lower right")
    fig.tight_layout()
    fig.savefig(args.output)
    print(f"wrote {args.output} ({len(series)} series, {len(ticks)} sizes)")


if __name__ == "__main__":
    main()
