"""Runs the static-batch engine that engine v2 replaced, from a git worktree, for
`bench/engine_throughput.py` (system `old-engine`).

Usage (the bench calls it; `rap` must resolve to the worktree's package):
    PYTHONPATH=<worktree> python bench/old_engine_driver.py < job.json > result.json

A job is {"mode": "offline" | "online", "rows": [...], "rate": float, "seed": int}. Offline: every
prompt submitted at once, useful tokens/s. Online: the same Poisson arrivals as the bench's other
systems (same rng, same seed), one mark per request {sent, first, end, n}. The engine runs as it
did in serving (`Engine.submit`, its default batch window and size 8, dense: a budget that never
binds), with EOS ignored like every other system of the bench (the model reports no EOS id).
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from typing import Any

import torch


def build() -> Any:
    from rap.core.loading import load_model
    from rap.serving.engine import Engine, EngineConfig

    torch.set_num_threads(2)
    model = load_model("smollm2", dtype="float32", device="cpu")
    model.config.eos_token_id = None  # EOS ignored: equal work in every system
    model.hf.generation_config.eos_token_id = None
    return Engine(model, EngineConfig(max_batch_size=8), budget_bytes=2**40, planner=None)


def request(row: dict[str, Any]) -> Any:
    from rap.serving.engine import GenRequest

    return GenRequest(row["prompt_ids"], row["max_tokens"])


async def run_one(engine: Any, row: dict[str, Any], mark: dict[str, float]) -> None:
    async for event in engine.submit(request(row)):
        now = time.perf_counter()
        if event["type"] == "token" and "first" not in mark:
            mark["first"] = now
        if event["type"] == "error":
            raise RuntimeError(event["message"])
        if event["type"] == "done":
            mark["end"], mark["n"] = now, event.get("completion_tokens", row["max_tokens"])


async def offline(engine: Any, rows: list[dict[str, Any]]) -> dict[str, Any]:
    marks: list[dict[str, float]] = [{} for _ in rows]
    start = time.perf_counter()
    await asyncio.gather(*(run_one(engine, r, m) for r, m in zip(rows, marks, strict=True)))
    return {"tokens_per_s": sum(m["n"] for m in marks) / (time.perf_counter() - start)}


async def online(engine: Any, rows: list[dict[str, Any]], rate: float, seed: int) -> dict:
    rng = random.Random(seed)
    marks: list[dict[str, float]] = []
    tasks = []
    for r in rows:
        await asyncio.sleep(rng.expovariate(rate))
        mark = {"sent": time.perf_counter()}
        marks.append(mark)
        tasks.append(asyncio.create_task(run_one(engine, r, mark)))
    await asyncio.gather(*tasks)
    return {"marks": marks}


async def main() -> None:
    jobs = json.load(sys.stdin)
    engine = build()
    await offline(engine, jobs[0]["rows"][:2])  # warm-up
    results = []
    for job in jobs:
        if job["mode"] == "offline":
            results.append(await offline(engine, job["rows"]))
        else:
            results.append(await online(engine, job["rows"], job["rate"], job["seed"]))
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    asyncio.run(main())
