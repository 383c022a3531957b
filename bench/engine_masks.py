"""Engine v2 under masks: tokens/s by kept bytes, and a budget drop under load.

Usage: .venv/bin/python bench/engine_masks.py [--out F.json]

1. Throughput: the committed prompts (`bench/data/engine_prompts.json`, EOS ignored) through
   `rap.serving.scheduler.Scheduler` on the default model (float32, 2 torch threads, 8 rows,
   256-token steps; `engine_throughput.offline_v2`) at masks mem-greedy plans to keep
   100 / 80 / 70 / 60 % of the dense model's weight bytes; useful tokens/s, median of
   `--repeats` runs interleaved, and the ratio to dense (target: ≥ 1.25× at 70 %).
2. A budget drop under load: 8 requests stream through an `Engine`; the budget falls to 60 % of
   the dense peak. Every 2 ms a sampler reads the bytes the engine holds — measured from the
   tensors (`PrunableModel.weight_bytes()` + the page pool's storages + one step's
   activations), not predicted — and reports the time from the drop until they are within the
   new budget, the bytes·seconds above it meanwhile, the peak excess, and the preemptions.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import torch
from engine_throughput import PROMPTS, offline_v2  # the same scheduler run, per mask

from rap.core import memory
from rap.core.loading import load_model
from rap.planning import HeuristicPolicy
from rap.serving.engine import Engine, EngineConfig
from rap.serving.scheduler import Request
from rap.serving.sizing import engine_peak_bytes

CONFIG = EngineConfig(max_batch_size=8, max_step_tokens=256, target_seq=512, grow_after_s=0)


def masks_by_share(model: Any) -> dict[str, Any]:
    """Masks keeping about each share of the dense weight bytes (mem-greedy, no floor)."""
    planner = HeuristicPolicy(model.config, model.model_id, model.dtype, "mem-greedy", 0.0)
    weights = memory.weight_bytes(model.config, model.dense_mask(), model.dtype)
    extra = engine_peak_bytes(model, CONFIG, model.dense_mask(), 1, 16) - weights
    out = {}
    for share in (1.0, 0.8, 0.7, 0.6):
        mask = model.dense_mask()
        if share < 1.0:
            mask = planner.plan(int(share * weights) + extra, 1, 16, 16)
        out[f"{share:.0%}"] = mask
    return out


def by_mask(model: Any, rows: list[dict], repeats: int) -> dict[str, Any]:
    masks = masks_by_share(model)
    dense_weights = memory.weight_bytes(model.config, model.dense_mask(), model.dtype)
    offline_v2(model, rows[:2])  # warm-up
    runs: dict[str, list[float]] = {name: [] for name in masks}
    for _ in range(repeats):
        for name, mask in masks.items():
            model.apply(mask.model_copy(update={"version": model.mask.version}))
            runs[name].append(offline_v2(model, rows))
    model.apply(model.dense_mask().model_copy(update={"version": model.mask.version}))
    dense = statistics.median(runs["100%"])
    out: dict[str, Any] = {}
    for name, mask in masks.items():
        rate = statistics.median(runs[name])
        share = memory.weight_bytes(model.config, mask, model.dtype) / dense_weights
        out[name] = {
            "tokens_per_s": rate,
            "runs": runs[name],
            "speedup": rate / dense,
            "weight_share": share,
            "kept_blocks": mask.kept_fraction,
            "mask": mask.key,
        }
        print(
            f"{name} of the weights ({share:.3f}, {mask.kept_fraction:.3f} of blocks): "
            f"{rate:.1f} tokens/s, {rate / dense:.2f}x dense",
            flush=True,
        )
    return out


def held_bytes(engine: Engine) -> int:
    pool = engine.scheduler.pool
    step = engine.sizing.step_bytes() if pool.capacity else 0
    return int(engine.model.weight_bytes() + pool.nbytes + step)


def budget_drop(model: Any, rows: list[dict]) -> dict[str, Any]:
    planner = HeuristicPolicy(model.config, model.model_id, model.dtype, "mem-greedy", 0.5)
    dense_peak = engine_peak_bytes(model, CONFIG, model.dense_mask(), 8, CONFIG.target_seq)
    engine = Engine(model, CONFIG, dense_peak, planner)
    samples: list[tuple[float, int, int]] = []
    stop = threading.Event()

    def sampler() -> None:
        while not stop.is_set():
            samples.append((time.perf_counter(), held_bytes(engine), engine.budget_bytes))
            time.sleep(0.002)

    async def load() -> float:
        reqs = [Request(r["prompt_ids"][:64], 120, ignore_eos=True) for r in rows[:8]]
        streams = [engine.submit(r) for r in reqs]
        for s in streams:
            await s.__anext__()  # every row has started
        await asyncio.sleep(1.0)
        dropped = time.perf_counter()
        engine.set_budget(int(0.6 * dense_peak))
        for s in streams:
            async for _ in s:
                pass
        return dropped

    thread = threading.Thread(target=sampler, daemon=True)
    thread.start()
    dropped = asyncio.run(load())
    stop.set()
    thread.join()
    after = [(t, held, budget) for t, held, budget in samples if t >= dropped]
    over = [(t, held - budget) for t, held, budget in after]
    comply = next((t for t, excess in over if excess <= 0), None)
    area = sum(max(e, 0) * 0.002 for _, e in over)
    return {
        "dense_peak_bytes": dense_peak,
        "new_budget_bytes": int(0.6 * dense_peak),
        "time_to_comply_s": None if comply is None else comply - dropped,
        "bytes_seconds_over_budget": area,
        "peak_excess_bytes": max((e for _, e in over), default=0),
        "preemptions": engine.scheduler.stats.preempted,
        "mask_after": model.mask.fingerprint(),
        "samples": len(after),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    model = load_model("smollm2", dtype="float32", device="cpu")
    rows = json.loads(PROMPTS.read_text())["rows"]
    result = {
        "throughput": by_mask(model, rows, args.repeats),
        "budget_drop": budget_drop(model, rows),
    }
    drop = result["budget_drop"]
    print(
        f"budget drop to 60 %: within budget after {drop['time_to_comply_s']} s, "
        f"{drop['bytes_seconds_over_budget'] / 2**20:.3f} MiB·s over, peak excess "
        f"{drop['peak_excess_bytes'] / 2**20:.1f} MiB, {drop['preemptions']} preemptions"
    )
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
