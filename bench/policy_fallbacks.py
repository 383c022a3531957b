"""How often the RAP policy falls back to mem-greedy where it serves: the controller's bucket
grid, at the serving quality floor and dtype.

Usage: .venv/bin/python bench/policy_fallbacks.py [--policy DIR] [--budgets 100] [--out F.json]

The shipped policy was trained with no quality floor (its metadata: `min_kept_fraction` 0.0)
on float16 byte tables; serving runs `EngineConfig().min_kept_fraction` (0.5) and float32 on a
CPU, float16 on a GPU. For every (batch, seq) bucket of `ControllerConfig()`'s grid and each
dtype, the script sweeps `--budgets` budgets evenly from the smallest peak the floor allows to
the dense peak, asks `RapPolicy.plan` for a mask (what the controller calls), and counts
decisions, fallbacks (the agent stopped over budget: `controller:rap-fallback`) and budgets no
allowed mask meets. For the same situations it also plans mem-greedy at the same floor and
prints the mean ln perplexity of both on the shipped surrogate (the env's quality model, capped
at ln V as the env caps it) where both found a mask, so that a change that removes fallbacks can
be seen not to cost quality. "no mask" counts budgets where a planner found none that fits.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from rap.core.errors import BudgetError
from rap.core.loading import load_config
from rap.planning import HeuristicPolicy, RapPolicy
from rap.planning.surrogate import load_surrogate
from rap.serving.controller import ControllerConfig
from rap.serving.engine import EngineConfig


def _dropped(mask) -> np.ndarray:  # type: ignore[no-untyped-def]
    return 1.0 - np.array([*mask.attn, *mask.mlp], dtype=np.float64)


def sweep(policy_dir: str | None, dtype: str, floor: float, budgets: int) -> dict:
    config, model_id = load_config("smollm2")
    policy = RapPolicy.load(policy_dir, config, model_id, dtype, floor)
    greedy = HeuristicPolicy(config, model_id, dtype, "mem-greedy", floor)
    quality = load_surrogate(model_id)
    grid = ControllerConfig()
    cap = float(np.log(config.vocab_size))  # the env's cap: beyond ln V a model is broken
    buckets: dict[str, dict[str, int]] = {}
    q_rap: list[float] = []
    q_greedy: list[float] = []
    no_fit = {"rap": 0, "mem-greedy": 0}
    for b in grid.batch_buckets:
        for s in grid.seq_buckets:
            base, sizes = policy.observer.table(b, s, None)
            lo = base + np.sort(sizes)[: policy.observer.n - policy.observer.max_drops].sum()
            before = (policy.decisions, policy.fallbacks)
            for budget in np.linspace(lo, base + sizes.sum(), budgets).astype(int):
                masks = {}
                for name, planner in (("rap", policy), ("mem-greedy", greedy)):
                    try:
                        masks[name] = planner.plan(int(budget), b, s)
                    except BudgetError:
                        no_fit[name] += 1
                if len(masks) == 2:
                    q_rap.append(min(quality.lnppl(_dropped(masks["rap"])), cap))
                    q_greedy.append(min(quality.lnppl(_dropped(masks["mem-greedy"])), cap))
            buckets[f"{b}x{s}"] = {
                "decisions": policy.decisions - before[0],
                "fallbacks": policy.fallbacks - before[1],
            }
    return {
        "dtype": dtype,
        "min_kept_fraction": floor,
        "decisions": policy.decisions,
        "fallbacks": policy.fallbacks,
        "fallback_rate": round(policy.fallback_rate, 4),
        "no_mask_found": no_fit,
        "mean_lnppl": {"rap": float(np.mean(q_rap)), "mem-greedy": float(np.mean(q_greedy))},
        "rap_better_or_equal": int(np.sum(np.array(q_rap) <= np.array(q_greedy) + 1e-9)),
        "situations_both_planned": len(q_rap),
        "buckets": buckets,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", help="exported policy folder (default: the shipped one)")
    parser.add_argument("--budgets", type=int, default=100, help="budgets per bucket")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args()
    floor = EngineConfig().min_kept_fraction
    runs = [
        sweep(args.policy, dtype, f, args.budgets)
        for dtype in ("float32", "float16")
        for f in (floor, 0.0)
    ]
    print(
        f"{'dtype':<8} {'floor':>5} {'decisions':>9} {'fallbacks':>9} {'rate':>7} "
        f"{'no mask: rap':>12} {'greedy':>6} {'lnppl rap':>9} {'mem-greedy':>10} "
        f"{'rap ≤ greedy':>12}"
    )
    for r in runs:
        q = r["mean_lnppl"]
        print(
            f"{r['dtype']:<8} {r['min_kept_fraction']:>5.2f} {r['decisions']:>9} "
            f"{r['fallbacks']:>9} {r['fallback_rate']:>7.2%} {r['no_mask_found']['rap']:>12} "
            f"{r['no_mask_found']['mem-greedy']:>6} {q['rap']:>9.3f} {q['mem-greedy']:>10.3f} "
            f"{r['rap_better_or_equal']:>5}/{r['situations_both_planned']:<6}"
        )
    if args.out:
        args.out.write_text(json.dumps(runs, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
