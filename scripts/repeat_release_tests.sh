#!/usr/bin/env bash
# The release (RSS) tests, repeated: SUITE times inside the whole fast tier (suite order: every
# test collected before them runs first, in the same process) and BUSY times alone with both
# cores kept busy by spinning shells. Prints one line per run and the counts; exits 1 on any
# failure. Usage: SUITE=50 BUSY=20 bash scripts/repeat_release_tests.sh   (~1 h on 2 cores)
set -uo pipefail
cd "$(dirname "$0")/.."
suite=${SUITE:-50} busy=${BUSY:-20} bin=.venv/bin fails=0
log=$(mktemp -d)
for i in $(seq 1 "$suite"); do
  if $bin/python -m pytest -q -p no:cacheprovider -m "not slow and not gpu" >"$log/suite$i" 2>&1
  then echo "suite run $i: $(tail -1 "$log/suite$i")"
  else echo "suite run $i FAILED: $(grep -m1 FAILED "$log/suite$i")"; fails=$((fails + 1)); fi
done
spin() { while :; do :; done; }
spin & s1=$!; spin & s2=$!
trap 'kill $s1 $s2 2>/dev/null' EXIT
for i in $(seq 1 "$busy"); do
  if $bin/python -m pytest -q -p no:cacheprovider tests/core/test_release.py >"$log/busy$i" 2>&1
  then echo "busy run $i: $(tail -1 "$log/busy$i")"
  else echo "busy run $i FAILED: $(grep -m1 FAILED "$log/busy$i")"; fails=$((fails + 1)); fi
done
echo "$suite suite runs + $busy busy runs: $fails failed (logs in $log)"
[ "$fails" -eq 0 ]
