#!/usr/bin/env bash
# The GPU run (issue 19). On the GPU machine, after bench/gpu/stage.sh's first call:
#   bash bench/gpu/run.sh --install            Ray set + gguf from .whl into /tmp/site
#   bash bench/gpu/run.sh --take .carryN        one part of the model tar into /tmp/stage
#   bash bench/gpu/run.sh --unpack              the model tar, reassembled, into /tmp/site
#   bash bench/gpu/run.sh [--parts P,..] [--budget-s S]   measure (default: memory,blocks,decode;
#                                               also: scan, tests = the suite's gpu-marked tests,
#                                               replicas = two 7B replicas under Ray Serve and a
#                                               co-tenant; needs Ray: --install first;
#                                               [--replicas-budget-s S], default 170)
#   bash bench/gpu/run.sh --dry-run             here on the CPU: sizes, imports, arguments, format;
#                                               a fixed small amount of work, run to the end
#                                               however slow the machine: no budget, no deadline
# Writes $OUT/gpu.json (the device tool's folder; ./out/gpu elsewhere), rewritten after each point,
# so a run cut off returns what it measured. Parts: measure.py's (memory, blocks, decode) on a
# Llama-2-7B-shaped random model, then `scan`: a one-shot block scan of the default model
# (float32, as the committed CPU scan) beside the committed CPU time and scores. `replicas`
# (bench/gpu/replicas.py) writes $OUT/gpu-replicas.json, same format, its own file.
set -uo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
out=${OUT:-$root/out/gpu}
mkdir -p "$out"
export PYTHONPATH=/tmp/site:$root PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
export RAP_CACHE_DIR=${RAP_CACHE_DIR:-/tmp/rap-cache}
py=python3
[ -x .venv/bin/python ] && py=.venv/bin/python
parts=memory,blocks,decode
budget=200
rbudget=170
dry=
while [ $# -gt 0 ]; do
  case $1 in
    --install)
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
      echo "installed $(ls .whl | wc -l) wheels into /tmp/site"; exit 0 ;;
    --take)  # one part of the model tar, kept in /tmp/stage until --unpack
      mkdir -p /tmp/stage && cp "$2"/* /tmp/stage/ && echo "staged: $(ls /tmp/stage | paste -sd " ")"; exit $? ;;
    --unpack)
      mkdir -p /tmp/site && cat /tmp/stage/model.tar.part* | tar -C /tmp/site -xf - || exit 1
      echo "model and calibration text unpacked into /tmp/site"; exit 0 ;;
    --parts) parts=$2; shift ;;
    --budget-s) budget=$2; shift ;;
    --replicas-budget-s) rbudget=$2; shift ;;
    --dry-run) dry=--dry-run ;;
    *) echo "unknown argument $1: expected --install, --take DIR, --unpack, --parts, --budget-s, --replicas-budget-s, --dry-run" >&2
       exit 2 ;;
  esac
  shift
done
if [ -n "$dry" ]; then
  for d in .whl .carry1 .carry2; do
    [ -d $d ] && echo "carry $d: $(du -sb $d | cut -f1) bytes" || echo "carry $d: not prepared (bash bench/gpu/stage.sh)"
  done
  echo "working tree: $(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1) bytes"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv 2>/dev/null \
  || echo "nvidia-smi: none (CUDA is absent)"
measure=$(echo "$parts" | tr , '\n' | grep -vx 'scan\|tests\|replicas' | paste -sd, -)
# Budgets are the GPU run's (its device time is counted); a dry run does its fixed work.
if [ -n "$measure" ]; then
  if [ -n "$dry" ]; then
    $py bench/gpu/measure.py --out "$out" --parts "$measure" --dry-run
  else
    $py bench/gpu/measure.py --out "$out" --parts "$measure" --budget-s "$budget"
  fi
fi
if echo "$parts" | tr , '\n' | grep -qx replicas; then
  if [ -n "$dry" ]; then
    $py bench/gpu/replicas.py --out "$out" --dry-run
  else  # its own deadline; timeout: a backstop
    timeout -k 10 $((${rbudget%.*} + 30)) \
      $py bench/gpu/replicas.py --out "$out" --budget-s "$rbudget"
  fi
fi
if echo "$parts" | tr , '\n' | grep -qx scan; then
  $py bench/gpu/scan.py --out "$out" $dry
fi
if echo "$parts" | tr , '\n' | grep -qx tests; then  # the suite's gpu-marked tests, here
  $py -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tail -15 | tee "$out/gpu-tests.log"
fi
