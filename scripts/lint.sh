#!/usr/bin/env bash
# Lint, format check, type check and the import rules: the same command locally and in CI.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=.venv/bin
$bin/ruff check .
$bin/ruff format --check .
$bin/mypy
$bin/lint-imports --no-cache
