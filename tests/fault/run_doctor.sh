#!/usr/bin/env bash
# The flight recorder and ringflow-doctor under mpirun: one rank of
# fault_inject stops (SIGSTOP) at its 21st allreduce while the others wait.
#   timeout: RINGFLOW_TIMEOUT=3 ends the job; the ranks dump on the failure
#            (and on the SIGTERM with which mpirun ends the job);
#   sigusr1: no timeout; SIGUSR1 to the running ranks makes them dump while
#            they hang, then the job is ended by hand.
# Either way ringflow-doctor must exit 1 and point at the stopped rank 1.
#
#   run_doctor.sh path/to/fault_inject path/to/ringflow-doctor [np]
set -u
bin=$1
doctor=$2
np=${3:-3}
flags=(--oversubscribe)
[[ $(id -u) == 0 ]] && flags+=(--allow-run-as-root)
failures=0

# The pids whose parent is $1 (from /proc: no procps needed).
children_of() {
  local f stat
  for f in /proc/[0-9]*/stat; do
    stat=$(cat "$f" 2>/dev/null) || continue
    stat=${stat##*) }  # after the command name, which may hold spaces
    read -r _ ppid _ <<<"$stat"
    [[ $ppid == "$1" ]] && { f=${f#/proc/}; echo "${f%/stat}"; }
  done
}
# The doctor must name rank 1 as where to look: at the end of the wait
# chain, late, behind, or without a dump.
pointer='waits on no one in #20|LATE: rank 1 |BEHIND: rank 1 |no dump from (rank 1|ranks[0-9,]*1)'

check() {  # case dir
  local out rc
  out=$("$doctor" "$2" 2>&1)
  rc=$?
  echo "$out" | sed 's/^/    | /'
  if ((rc != 1)); then
    echo "run_doctor: $1: ringflow-doctor exited $rc, expected 1 (problem found)"
    failures=$((failures + 1))
  elif ! grep -Eq "$pointer" <<<"$out"; then
    echo "run_doctor: $1: ringflow-doctor did not point at rank 1"
    failures=$((failures + 1))
  elif ! grep -q "#20 allreduce(float, sum, count=1000)" <<<"$out"; then
    echo "run_doctor: $1: ringflow-doctor did not name collective #20"
    failures=$((failures + 1))
  else
    echo "run_doctor: $1: ok"
  fi
}

# Case 1: the timeout.
start=$(date +%s)
dir=$(mktemp -d)
RINGFLOW_TIMEOUT=3 RINGFLOW_FLIGHT_DIR=$dir timeout -s KILL 60 \
  mpirun "${flags[@]}" -np "$np" -x RINGFLOW_TIMEOUT -x RINGFLOW_FLIGHT_DIR \
  "$bin" stop ring 1 >"$dir/log" 2>&1
echo "run_doctor: timeout: mpirun exited $? after $(($(date +%s) - start)) s; dumps: $(cd "$dir" && ls ringflow-flight.*.jsonl 2>/dev/null | tr '\n' ' ')"
check timeout "$dir"
rm -rf "$dir"

# Case 2: SIGUSR1 while the job hangs (no timeout within the test). mpirun
# forwards SIGUSR1 to every rank; the stopped one cannot act on it.
dir=$(mktemp -d)
RINGFLOW_TIMEOUT=120 RINGFLOW_FLIGHT_DIR=$dir \
  mpirun "${flags[@]}" -np "$np" -x RINGFLOW_TIMEOUT -x RINGFLOW_FLIGHT_DIR \
  "$bin" stop ring 1 >"$dir/log" 2>&1 &
job=$!
(  # a guard that ends with the job (its own sleeps hold no pipe open)
  for ((i = 0; i < 450; ++i)); do
    sleep 0.2
    kill -0 "$job" 2>/dev/null || exit 0
  done
  kill -KILL "$job"
) >/dev/null 2>&1 &
sleep 4  # the ranks reach call 20 within a second; rank 1 stops there
kill -USR1 "$job"
want=$((np - 1))
n=0
for ((i = 0; i < 50; ++i)); do
  sleep 0.2
  n=$(ls "$dir"/ringflow-flight.*.jsonl 2>/dev/null | wc -l)
  ((n >= want)) && break
done
echo "run_doctor: sigusr1: $n dumps from the $want running ranks"
sleep 0.5
mkdir "$dir.snap"
cp "$dir"/ringflow-flight.*.jsonl "$dir.snap"/ 2>/dev/null  # before the job's end adds more
ranks=$(children_of "$job")
kill -CONT $ranks 2>/dev/null  # the stopped rank goes on, hears the job end
kill -TERM "$job" 2>/dev/null
for ((i = 0; i < 50; ++i)); do
  kill -0 "$job" 2>/dev/null || break
  sleep 0.2
done
kill -KILL "$job" $ranks 2>/dev/null
wait "$job" 2>/dev/null
if ((n < want)); then
  echo "run_doctor: sigusr1: expected $want dumps"
  failures=$((failures + 1))
else
  check sigusr1 "$dir.snap"
fi
rm -rf "$dir" "$dir.snap"

((failures == 0)) && echo "run_doctor: all cases ok"
exit $((failures > 0))
