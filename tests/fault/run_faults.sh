#!/usr/bin/env bash
# Runs fault_inject for every fault case x algorithm x rank count and checks
# that the whole job ends (non-zero) within RINGFLOW_TIMEOUT + a few seconds
# with the error that names the problem; prints one line per run and the total.
#
#   run_faults.sh path/to/fault_inject   (FAULT_TIMEOUT=3 seconds, FAULT_NP="3 4",
#                                         FAULT_ALGOS="ring auto native shm", FAULT_CASES=...)
set -u
bin=$1
tmo=${FAULT_TIMEOUT:-3}
bound=$((tmo + 12))  # the timeout, the 5 s grace of a broken job, start-up on a loaded machine
nps=${FAULT_NP:-"3 4"}
algos=${FAULT_ALGOS:-"ring auto native shm"}
cases=${FAULT_CASES:-"none stop kill throw skip op count count0 dtype"}
flags=(--oversubscribe)
[[ $(id -u) == 0 ]] && flags+=(--allow-run-as-root)

# What the output must contain for each case (an extended regex). A rank that
# skips a call or passes count 0 may simply finish first: 'has left the job'.
# (mpirun's exit status is 137 when it reports a rank killed by signal 9.)
expect() {
  case $1 in
    none) echo 'all calls done' ;;
    stop) echo 'did not complete within|waited [0-9]+ ms' ;;
    kill) echo 'signal 9|Killed|killed' ;;
    throw) echo 'injected failure' ;;
    skip | count0) echo 'collective mismatch|must pass the same count|has left the job' ;;
    *) echo 'collective mismatch|must pass the same count' ;;
  esac
}

# Flight-recorder dumps of the broken jobs go to a directory of our own.
RINGFLOW_FLIGHT_DIR=$(mktemp -d)
export RINGFLOW_FLIGHT_DIR
trap 'rm -rf "$RINGFLOW_FLIGHT_DIR"' EXIT

failures=0
for np in $nps; do
  for algo in $algos; do
    for c in $cases; do
      log=$(mktemp)
      start=$(date +%s%N)
      RINGFLOW_TIMEOUT=$tmo timeout -s KILL $((bound + 30)) \
        mpirun "${flags[@]}" -np "$np" "$bin" "$c" "$algo" 1 >"$log" 2>&1
      rc=$?
      ms=$((($(date +%s%N) - start) / 1000000))
      verdict=ok
      want=$(expect "$c")
      if [[ $c == none ]]; then
        ((rc == 0)) || verdict="FAIL(rc $rc)"
      elif ((rc == 0)); then
        verdict="FAIL(exit 0)"
      elif [[ $c != kill ]] && ((rc > 128)); then
        verdict="FAIL(crash, rc $rc)"  # a signal: heap corruption, an uncaught exception
      elif ((ms >= (bound + 30) * 1000)); then
        verdict="FAIL(hung)"
      elif ((ms > bound * 1000)); then
        verdict="FAIL(slow)"
      fi
      if [[ $verdict == ok ]] && ! grep -Eq "$want" "$log"; then verdict="FAIL(message)"; fi
      line=$(printf '%-7s %-7s np=%s rc=%-3s %3d.%d s  %s' "$c" "$algo" "$np" "$rc" $((ms / 1000)) $((ms % 1000 / 100)) "$verdict")
      echo "$line"
      if [[ $verdict != ok ]]; then
        failures=$((failures + 1))
        sed 's/^/    | /' "$log" | head -20
      else
        # The first error line the job printed, for the record.
        grep -Em1 "$want" "$log" | cut -c1-200 | sed 's/^/    > /'
      fi
      rm -f "$log"
    done
  done
done
echo
echo "fault injection: RINGFLOW_TIMEOUT=$tmo s, bound $bound s; $failures failure(s)"
exit $((failures > 0))
