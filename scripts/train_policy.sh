#!/usr/bin/env bash
# Trains the default RAP policy the way the shipped one was trained (docs/agent.md):
#   round 0: PPO on the perplexity surrogate (rllib_configs/ppo.py, 120 iterations);
#   rounds 1..ROUNDS (DAgger-style): list the masks the current policy chooses on *training*
#     scenarios, measure them with the real model (the `fit` text), report how far the surrogate
#     flattered them (its bias before the refit), refit the surrogate on every measurement, and
#     continue training for ITERATIONS iterations.
# The held-out scenarios and the evaluation text are never used. Then compare with
#   python bench/compare_policies.py --policy $OUT/round$ROUNDS/policy --measure
# and ship with: cp -r $OUT/round$ROUNDS/policy/{module,policy.safetensors,rap-policy.json} rap/data/policy/
# Env: OUT (runs/policy), ROUNDS (3), ITERATIONS (40), RAP_TRAIN_SCORES (oneshot).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-runs/policy}
rounds=${ROUNDS:-3}
export RAP_TRAIN_SCORES=${RAP_TRAIN_SCORES:-oneshot}
py=.venv/bin/python
mkdir -p "$out"
train() {  # train OUT_DIR [START_FROM]
    local from=()
    [ -n "${2:-}" ] && from=(--start-from "$2/policy")
    .venv/bin/rap train --config rllib_configs/ppo.py --env-runners 0 --out "$1" "${from[@]}" \
        >"$1.log" 2>&1 || { tail -20 "$1.log"; exit 1; }
    echo "$1: $(tail -1 "$1/train_log.jsonl")"
}
[ -f "$out/round0/policy/rap-policy.json" ] || train "$out/round0"
for r in $(seq 1 "$rounds"); do  # a finished round is kept: the script resumes
    [ -f "$out/round$r/policy/rap-policy.json" ] && continue
    prev="$out/round$((r - 1))" keys="$out/round$r.keys"
    "$py" bench/compare_policies.py --policy "$prev/policy" --split train --per-scenario 10 \
        --seeds 3 --keys-out "$keys"
    "$py" -m rap.importance.quality measure --part fit --keys "$keys" --threads 2 | tail -1
    echo "surrogate on round $((r - 1))'s masks before the refit: $("$py" -m rap.agent.surrogate_fit --check "$keys")"
    "$py" -m rap.importance.quality export --part fit
    "$py" -m rap.agent.surrogate_fit >"$out/surrogate$r.json"
    RAP_TRAIN_ITERATIONS=${ITERATIONS:-40} train "$out/round$r" "$prev"
done
