#!/usr/bin/env bash
# The whole test run, as CI runs it (after scripts/setup.sh):
#   1. lint and format (ruff) and types (mypy), one command locally and in CI: scripts/lint.sh
#   2. every test but the GPU ones: the fast tier, then the slow tier (real Ray, RLlib, real model)
#   3. the tiny-model tests again on the oldest transformers claimed (constraints-oldest.txt)
# GPU tests (marker `gpu`) skip without CUDA. `pytest` alone runs the fast tier only.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=.venv/bin
bash scripts/lint.sh
$bin/python -m pytest -q -m "not slow and not gpu"
$bin/python -m pytest -q -m "slow and not gpu"
oldest=.venv/oldest-site
if [ ! -f "$oldest/.complete" ]; then
  rm -rf "$oldest"
  $bin/python -m pip install -q --disable-pip-version-check --no-deps --target "$oldest" \
    -r constraints-oldest.txt
  touch "$oldest/.complete"
fi
PYTHONPATH="$oldest" $bin/python -m pytest -q -m "not slow and not gpu" -p no:cacheprovider
