"""How long the RAP policy takes to decide: one mask, and telemetry in → MaskPlan out.

Usage: .venv/bin/python bench/policy_latency.py [--policy DIR] [--situations 400] [--repeat 3]

For the default model (float16 budgets) and the held-out scenarios of `rap.agent.workloads`, times
`RapPolicy.plan` (the exported network run greedily through the env's observation loop, no
RLlib) on situations that need pruning, and mem-greedy on the same ones for reference; then a
controller decision end to end: `Controller.report(telemetry)` planning every workload bucket
of its grid with the policy and returning the MaskPlan. Prints p50 and p99 in milliseconds and
the policy's fallback count. The paper reports 0.5 s per step; the target here is < 1 ms.
"""

from __future__ import annotations

import argparse
import contextlib
import time

import numpy as np

from rap.agent import scenarios, workloads
from rap.core.errors import BudgetError
from rap.core.loading import load_config
from rap.planning import HeuristicPolicy, RapPolicy
from rap.serving.controller import Controller
from rap.serving.messages import DeviceMemory, Telemetry


def _pct(ms: list[float]) -> str:
    return f"p50 {np.percentile(ms, 50):.3f} ms, p99 {np.percentile(ms, 99):.3f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", help="exported policy folder (default: the packaged one)")
    parser.add_argument("--situations", type=int, default=400)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    config, model_id = load_config("smollm2")
    policy = RapPolicy.load(args.policy, config, model_id, "float16")
    greedy = HeuristicPolicy(config, model_id, "float16")
    per = max(1, args.situations // len(scenarios.names("validation")))
    seed = scenarios.VALIDATION_SEED_BASE
    sits = [
        s
        for name in scenarios.names("validation")
        for s in workloads.situations(name, config, "float16", seed, per)
    ]
    # Wall time, and this thread's CPU time (what the decision costs without the preemption
    # that a shared machine adds to wall time).
    wall: dict[str, list[float]] = {"rap": [], "mem-greedy": []}
    cpu: dict[str, list[float]] = {"rap": [], "mem-greedy": []}
    for _ in range(args.repeat):
        for s in sits:
            for name, planner in (("rap", policy), ("mem-greedy", greedy)):
                t0, c0 = time.perf_counter(), time.thread_time()
                with contextlib.suppress(BudgetError):
                    planner.plan(s.budget_bytes, s.batch, s.seq, s.prefill)
                cpu[name].append(1e3 * (time.thread_time() - c0))
                wall[name].append(1e3 * (time.perf_counter() - t0))
    print(
        f"{len(sits)} held-out situations × {args.repeat}; policy {policy.net.meta['algo']} "
        f"({policy.net.num_params:,} parameters)"
    )
    for name in wall:
        print(f"{name:<11} one decision: wall {_pct(wall[name])}; CPU {_pct(cpu[name])}")
    print(f"policy decisions {policy.decisions}, fallbacks {policy.fallbacks}")
    end_to_end(policy, sits)


def end_to_end(policy: RapPolicy, sits: list[scenarios.Situation]) -> None:
    """Controller.report(telemetry) → MaskPlan with the policy planning every bucket."""
    ctl = Controller(planner=policy)
    ms: list[float] = []
    buckets = 0
    for i, s in enumerate(sits):
        tel = Telemetry(
            replica="replica-0",
            timestamp_s=time.time(),
            device=DeviceMemory(
                kind="cpu", total_bytes=s.budget_bytes, used_bytes=0, free_bytes=s.budget_bytes
            ),
            budget_bytes=s.budget_bytes + i % 2,  # a new budget every time: a new plan
            weight_bytes=0,
        )
        t0 = time.perf_counter()
        plan = ctl.report(tel)
        ms.append(1e3 * (time.perf_counter() - t0))
        buckets += len(plan.entries) if plan else 0
    print(
        f"controller  telemetry → MaskPlan ({buckets / len(sits):.1f} buckets a plan): {_pct(ms)}"
    )


if __name__ == "__main__":
    main()
