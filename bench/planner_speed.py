"""How long a planner takes to choose a mask from stored scores (target: well under 1 ms).

Usage: .venv/bin/python bench/planner_speed.py [--repeat 2000]

For the default model (30 layers, float16) and each planner, times `plan_mask` over a grid of
workloads and budgets (batch 1/8/32 × 512/2048/8192 tokens × 95/80/60/40 % of dense weights +
KV) and prints the median and 99th percentile per call in microseconds. Scores are loaded once
before timing (the shipped JSON, cached in memory), as a server does.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

from rap.core import memory
from rap.core.errors import BudgetError
from rap.core.loading import DEFAULT_MODEL_ID, load_config
from rap.core.scores import load_default_scores
from rap.planning.planners import PLANNERS, SCORES_FOR, plan_mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=2000)
    args = parser.parse_args()
    config, _ = load_config("smollm2")
    grid = [(b, s, f) for b in (1, 8, 32) for s in (512, 2048, 8192) for f in (0.95, 0.8, 0.6, 0.4)]
    print(f"{'planner':<11} {'median µs':>10} {'p99 µs':>8}  ({len(grid)} workloads)")
    for method in PLANNERS:
        if method == "oracle":
            continue
        scores = load_default_scores(SCORES_FOR[method]) if method in SCORES_FOR else None
        times: list[float] = []
        for _ in range(max(1, args.repeat // len(grid))):
            for batch, seq, frac in grid:
                budget = memory.budget_bytes(config, frac, batch, seq, "float16")
                t0 = time.perf_counter()
                # A one-kind planner cannot reach every budget: its refusals are timed too.
                with contextlib.suppress(BudgetError):
                    plan_mask(
                        method, config, DEFAULT_MODEL_ID, budget, batch, seq, "float16", scores
                    )
                times.append(time.perf_counter() - t0)
        times.sort()
        p99 = times[int(0.99 * (len(times) - 1))]
        print(f"{method:<11} {statistics.median(times) * 1e6:>10.1f} {p99 * 1e6:>8.1f}")


if __name__ == "__main__":
    main()
