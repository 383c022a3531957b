#!/usr/bin/env bash
# The whole test run, as CI runs it (after scripts/setup.sh):
#   1. lint and format (ruff) and types (mypy), one command locally and in CI: scripts/lint.sh
#   2. every test but the GPU ones: the fast tier, then the slow tier (real Ray, RLlib, real model)
#   3. the tiny-model tests again on the oldest transformers claimed (constraints-oldest.txt)
# Every tier runs even when one before it failed (a slow-tier failure must not hide the oldest
# transformers' results); each tier's summary line is printed at the end, and the exit status is
# non-zero if any tier failed. Each test has a time limit (pytest-timeout; pyproject.toml holds
# the default): FAST_TIMEOUT_S for the fast tiers, SLOW_TIMEOUT_S for the slow one, so that a
# hung test fails alone instead of stalling CI.
# GPU tests (marker `gpu`) skip without CUDA. `pytest` alone runs the fast tier only.
set -uo pipefail
cd "$(dirname "$0")/.."
bin=.venv/bin
fast_timeout_s=${FAST_TIMEOUT_S:-300}
slow_timeout_s=${SLOW_TIMEOUT_S:-900}
oldest=.venv/oldest-site
summaries=()
failed=0

tier() {  # NAME COMMAND...: run it, keep its last non-empty line as the tier's summary
  local name=$1 log rc last
  shift
  echo "== $name"
  log=$(mktemp)
  "$@" 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  last=$(grep -v '^[[:space:]]*$' "$log" | tail -1)
  rm -f "$log"
  if [ "$rc" -eq 0 ]; then
    summaries+=("$name: ok: $last")
  else
    summaries+=("$name: FAILED (exit $rc): $last")
    failed=1
  fi
}

oldest_fast() {  # the oldest transformers beside the pinned set, then the fast tier on it
  if [ ! -f "$oldest/.complete" ]; then
    rm -rf "$oldest"
    $bin/python -m pip install -q --disable-pip-version-check --no-deps --target "$oldest" \
      -r constraints-oldest.txt || return
    mkdir -p "$oldest" && touch "$oldest/.complete"
  fi
  PYTHONPATH="$oldest" $bin/python -m pytest -q -m "not slow and not gpu" -p no:cacheprovider \
    --timeout "$fast_timeout_s"
}

tier lint bash scripts/lint.sh
tier fast $bin/python -m pytest -q -m "not slow and not gpu" --timeout "$fast_timeout_s"
tier slow $bin/python -m pytest -q -m "slow and not gpu" --timeout "$slow_timeout_s"
tier oldest-transformers oldest_fast
echo "== summary"
printf '%s\n' "${summaries[@]}"
exit "$failed"
