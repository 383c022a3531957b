#!/usr/bin/env bash
# The policy pipeline (scripts/train_policy.sh: PPO + 3 DAgger rounds, each refitting the
# surrogate) once per seed, every seed from the same shipped surrogate and measured table. The
# measurement cache is shared (a mask measured once has one value), and each refit exports all
# of it, so a later seed's DAgger refits see the masks earlier seeds measured too: seeds differ
# in their seed and in that. Each seed's refit surrogate and table are kept beside its policy:
#   $OUT/s$SEED/round3/policy, $OUT/s$SEED/data/{surrogate,fit table}.
# Then compare them on the validation split (docs/results.md) and ship the best there:
#   scripts/train_seeds.sh && for s in 0 1 2; do ...; done   (commands in docs/results.md)
# Env: OUT (runs/seeds), SEEDS ("0 1 2"), FROM (the git revision of rap/data to start from: HEAD).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-runs/seeds}
from=${FROM:-HEAD}
data=(rap/data/SmolLM2-135M-Instruct.surrogate.json rap/data/SmolLM2-135M-Instruct.lnppl-fit.json)
for seed in ${SEEDS:-0 1 2}; do
    dir="$out/s$seed"
    if [ -f "$dir/data/$(basename "${data[0]}")" ]; then continue; fi  # a finished seed is kept
    git checkout "$from" -- "${data[@]}"
    RAP_TRAIN_SEED=$seed OUT=$dir bash scripts/train_policy.sh
    mkdir -p "$dir/data" && cp "${data[@]}" "$dir/data/"
done
git checkout "$from" -- "${data[@]}"
