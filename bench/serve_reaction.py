"""Serving figures on a local Ray cluster: budget-change reaction time, share of engine steps
on controller masks, latency and throughput under a bounded burst.

    python bench/serve_reaction.py [--requests 48] [--out bench/results/serve_cpu.json]

Starts Ray and the app on the default model (two replicas), then:
1. changes replica-0's budget down and up several times through the admin endpoint and times
   (a) until the replica holds no more than the new budget (weights, from its telemetry) and
   (b) until the controller has re-planned for the new budget;
2. sends a burst of concurrent chat requests and reports the share of engine steps run on
   controller masks, time to first token and end-to-end latency percentiles, and tokens/s.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from rap.cli.serve import http_json
from rap.ops.ray_env import patient_serve_env

TOKEN = "bench-admin-token"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _state(url: str) -> dict[str, Any]:
    return http_json(f"{url}/admin/state", token=TOKEN)


def _plan(url: str) -> dict[str, Any]:
    view = _state(url)["controller"]["replicas"]["replica-0"]
    return {
        "version": view["plan"]["version"],
        "budget_seen_bytes": view["telemetry"]["budget_bytes"],
    }


def _until(pred: Any, timeout_s: float = 60.0) -> float:
    start = time.perf_counter()
    while time.perf_counter() - start < timeout_s:
        if pred():
            return time.perf_counter() - start
        time.sleep(0.02)
    return float("nan")


def budget_reactions(url: str, budgets_gib: list[float]) -> list[dict[str, float]]:
    rows = []
    for gib in budgets_gib:
        target = int(gib * 2**30)
        old = _plan(url)["version"]
        http_json(f"{url}/admin/budget", {"replica": "replica-0", "gib": gib}, TOKEN)
        t0 = time.perf_counter()

        def within(target: int = target) -> bool:
            return bool(_state(url)["replicas"]["replica-0"]["weight_bytes"] <= target)

        def replanned(target: int = target, old: str = old) -> bool:
            p = _plan(url)
            return bool(p["version"] != old and p["budget_seen_bytes"] == target)

        fit = _until(within)
        plan = _until(replanned) + fit
        rows.append(
            {
                "budget_gib": gib,
                "fit_s": fit,
                "controller_plan_s": plan,
                "total_s": time.perf_counter() - t0,
            }
        )
        print(
            f"budget → {gib:.2f} GiB: within budget after {fit * 1000:.0f} ms, "
            f"controller plan after {plan * 1000:.0f} ms"
        )
    return rows


def _one(url: str, model: str, i: int) -> dict[str, float]:
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    start = time.perf_counter()
    first, tokens = None, 0
    stream = client.chat.completions.create(
        model=model,
        max_tokens=32,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        messages=[{"role": "user", "content": f"Tell me fact number {i} about the sea."}],
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content and first is None:
            first = time.perf_counter() - start
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return {"ttft_s": first or float("nan"), "e2e_s": time.perf_counter() - start, "tokens": tokens}


def burst(url: str, n: int) -> dict[str, Any]:
    model = http_json(f"{url}/v1/models")["data"][0]["id"]
    before = _state(url)["replicas"]
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        rows = list(pool.map(lambda i: _one(url, model, i), range(n)))
    wall = time.perf_counter() - start
    after = _state(url)["replicas"]
    steps = sum(after[r]["steps"] - before[r]["steps"] for r in after)
    on_controller = sum(
        after[r]["steps_on_controller_mask"] - before[r]["steps_on_controller_mask"] for r in after
    )

    def pct(key: str, q: float) -> float:
        return statistics.quantiles([r[key] for r in rows], n=100)[int(q) - 1]

    out = {
        "requests": n,
        "steps": steps,
        "controller_share": on_controller / max(steps, 1),
        "ttft_p50_s": pct("ttft_s", 50),
        "ttft_p99_s": pct("ttft_s", 99),
        "e2e_p50_s": pct("e2e_s", 50),
        "e2e_p99_s": pct("e2e_s", 99),
        "tokens_per_s": sum(r["tokens"] for r in rows) / wall,
    }
    print(json.dumps(out, indent=1))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    import ray
    from ray import serve

    from deployments.app import build_app
    from rap.core.loading import resolve

    resolve("smollm2")
    os.environ["RAP_ADMIN_TOKEN"] = TOKEN
    port = _port()
    patient_serve_env()  # a loaded machine's proxy starts slowly
    ray.init(include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    config = {
        "model": "smollm2",
        "replicas": [
            {"name": "replica-0", "budget_gib": 0.6, "num_cpus": 0.5},
            {"name": "replica-1", "budget_gib": 0.6, "num_cpus": 0.5},
        ],
    }
    serve.run(build_app(config), name="rap", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    try:
        result = {
            "device": "cpu (2 cores)",
            "dtype": "float32",
            "reactions": budget_reactions(url, [0.45, 0.35, 0.6, 0.4, 0.6]),
            "burst": burst(url, args.requests),
        }
    finally:
        serve.shutdown()
        ray.shutdown()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
