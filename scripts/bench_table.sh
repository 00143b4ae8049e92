#!/usr/bin/env bash
# Turns ringflow-bench --csv files into Markdown tables (size, busbw, baseline busbw, ratio).
#
#   scripts/bench_table.sh run_np2.csv run_np4.csv
#
# Columns are found by name in the CSV header, so extra columns do not matter.
# Files without a baseline get size / time / busbw / wrong only.
set -euo pipefail

if [[ $# -eq 0 || $1 == -h || $1 == --help ]]; then
  echo "usage: $0 FILE.csv [FILE.csv ...]   (CSV written by ringflow-bench --csv)" >&2
  exit 2
fi

for f in "$@"; do
  if [[ ! -r $f ]]; then
    echo "$0: cannot read '$f'" >&2
    exit 2
  fi
  awk -F, -v file="$f" '
    function human(b) {
      if (b >= 1073741824 && b % 1073741824 == 0) return (b / 1073741824) " GiB"
      if (b >= 1048576 && b % 1048576 == 0) return (b / 1048576) " MiB"
      if (b >= 1024 && b % 1024 == 0) return (b / 1024) " KiB"
      return b " B"
    }
    NR == 1 {
      for (i = 1; i <= NF; i++) col[$i] = i
      if (!("bytes" in col) || !("busbw_GBs" in col)) {
        print file ": not a ringflow-bench CSV (no bytes/busbw_GBs columns)" > "/dev/stderr"
        exit 2
      }
      base = ("ratio" in col)
      next
    }
    NR == 2 {
      printf "%s: %s %s, %s, %s ranks\n\n", file, $col["coll"], $col["algo"], $col["type"], $col["ranks"]
      if (base) {
        print "| size | ringflow busbw (GB/s) | MPI busbw (GB/s) | ratio | #wrong |"
        print "|---:|---:|---:|---:|---:|"
      } else {
        print "| size | time (us) | busbw (GB/s) | #wrong |"
        print "|---:|---:|---:|---:|"
      }
    }
    {
      if (base) {
        printf "| %s | %.3f | %.3f | %.2f | %s |\n", human($col["bytes"]), $col["busbw_GBs"],
               $col["baseline_busbw_GBs"], $col["ratio"], $col["wrong"]
      } else {
        printf "| %s | %.2f | %.3f | %s |\n", human($col["bytes"]), $col["time_us"],
               $col["busbw_GBs"], $col["wrong"]
      }
    }
    END { print "" }
  ' "$f"
done
