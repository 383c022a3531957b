"""Part 3 of the GPU run: engine v2's decode step, dense and masked, beside `generate()`.

For each mask (dense, keeping 80 % and 60 % of the weight bytes), batch B ∈ {1, 8, 32} and
context C ∈ {512, 2048}: B rows of C prompt tokens are prefilled through
`rap.serving.scheduler.Scheduler`, then `STEPS` decode steps are timed (CUDA synchronised at
both ends):

    ms/step = elapsed / STEPS,   tokens/s = B · STEPS / elapsed
    bytes read per step = weights(mask) − embedding table (a lookup reads B of its rows)
                          + Σ_rows KV(row's tokens, kept attention layers)
    roofline share = bytes read per step / step time / device bandwidth

where the device bandwidth is a measured device-to-device copy, counted as 2 · bytes / time (a
copy reads and writes each byte). The engine runs twice per shape: `engine-graphs` replays each
decoder layer from a CUDA graph (`rap.serving.decode_graphs`; captured in the warm-up steps,
the captures and their seconds reported), `engine` launches every kernel from Python.
`generate()` (transformers, the model's own SDPA attention
and a `DynamicCache`) runs the same shapes in the same process: its decode time per step is
(time of 1 + STEPS new tokens − time of 1) / STEPS, which takes the prefill out.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from budget import Deadline
from common import apply, copy_bandwidth, cuda, mask_keeping, prompt_ids, restored_blocks, sync

from rap.core import memory
from rap.serving.kv_pages import PagePool
from rap.serving.rows import Request
from rap.serving.scheduler import Scheduler, SchedulerConfig

STEPS = 16
WARM = 2
GRID = [(32, 2048), (8, 2048), (1, 2048), (32, 512), (8, 512), (1, 512)]
PAGE_TOKENS = 16


def bytes_read_per_step(model: Any, batch: int, context: int) -> int:
    cfg, dt, mask = model.config, model.dtype, model.mask
    embedding = model.dims.vocab * model.dims.hidden * memory.dtype_bytes(dt)
    kv = memory.kv_bytes(cfg, mask, batch, context, dt)
    return memory.weight_bytes(cfg, mask, dt) - embedding + kv


def engine_decode(
    model: Any, batch: int, context: int, profile: bool = False, graphs: bool = False
) -> dict[str, Any]:
    """Prefill `batch` rows of `context` tokens, then time STEPS decode steps; with `profile`,
    also the profiler's top operators over two more steps (where a step's time goes); with
    `graphs`, decode steps replay CUDA graphs (captured during the WARM steps)."""
    d = model.dims
    step_tokens = max(4096, context)
    # Rows are prefilled a few per step and the first ones decode meanwhile: each row asks for
    # enough tokens to still be running at the last timed step (the H100 run of 2026-11-27
    # found rows leaving during the timed steps: B shrank as it was timed).
    prefill_steps = -(-batch * context // step_tokens) + 1
    new_tokens = prefill_steps + WARM + STEPS + 2
    per_row = -(-(context + new_tokens + 1) // PAGE_TOKENS)
    kept = [i for i, k in enumerate(model.mask.attn) if k]
    pool = PagePool(
        kept, batch * per_row, PAGE_TOKENS, d.kv_heads, d.head_dim, model.dtype, model.device
    )
    config = SchedulerConfig(
        max_running=batch,
        max_step_tokens=step_tokens,
        page_tokens=PAGE_TOKENS,
        max_wait_s=600,
        cuda_graphs=graphs,
    )
    sched = Scheduler(model, pool, config)
    done: list[dict[str, Any]] = []
    for r in range(batch):
        ids = prompt_ids(model, context, r)
        sched.add(Request(ids, new_tokens, ignore_eos=True), done.append)
    while not sched.running or any(row.prefilling for row in sched.running):
        sched.step()
    for _ in range(WARM):
        sched.step()
    held = sum(row.held for row in sched.running)
    sync()
    start = time.perf_counter()
    for _ in range(STEPS):
        sched.step()
    sync()
    elapsed = time.perf_counter() - start
    errors = [e for e in done if e["type"] == "error"]
    if errors:
        raise RuntimeError(f"engine rows failed: {errors[0]['message']}")
    if len(sched.running) != batch:
        raise RuntimeError(f"{batch - len(sched.running)} rows left during the timed steps")
    held += sum(row.held for row in sched.running)
    out: dict[str, Any] = {
        "ms_per_step": 1e3 * elapsed / STEPS,
        "tokens_per_s": batch * STEPS / elapsed,
        "mean_context": held / (2 * batch),
    }
    if sched.graphs is not None:
        s = sched.graphs.stats
        out["graphs"] = {
            "captures": s.captures,
            "capture_s": s.capture_s,
            "graphed_steps": s.graphed_steps,
            "reserved_bytes": torch.cuda.memory_reserved() if cuda() else None,
        }
    if profile:
        out["profile"] = _profile(sched, 2)
    while not sched.idle:
        sched.step()
    if sched.graphs is not None:
        sched.drop_graphs()
        if cuda():
            torch.cuda.empty_cache()
    return out


def _profile(sched: Any, steps: int) -> str:
    """The profiler's table of the operators that took most device (else CPU) time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda() else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            sched.step()
        sync()
    key = "cuda_time_total" if cuda() else "cpu_time_total"
    return str(prof.key_averages().table(sort_by=key, row_limit=15))


def generate_decode(model: Any, batch: int, context: int) -> dict[str, Any]:
    ids = [prompt_ids(model, context, r) for r in range(batch)]
    model.generate_ids(ids, 2, stop_at_eos=False)  # warm-up (kernels, allocator)
    times = {}
    for n in (1, 1 + STEPS):
        sync()
        start = time.perf_counter()
        model.generate_ids(ids, n, stop_at_eos=False)
        sync()
        times[n] = time.perf_counter() - start
    per_step = (times[1 + STEPS] - times[1]) / STEPS
    return {"ms_per_step": 1e3 * per_step, "tokens_per_s": batch / per_step}


def part_decode(model: Any, report: Any, deadline: Deadline, toy: bool) -> None:
    out = report.part("decode")
    bw = copy_bandwidth(1 << (20 if toy else 31))["d2d_bytes_per_s"]
    out["device_bytes_per_s"] = bw
    masks = {"dense": model.dense_mask(), "keep-80%": mask_keeping(model, 0.8)}
    masks["keep-60%"] = mask_keeping(model, 0.6)
    # A dense step on blocks never dropped, profiled, before any mask changes here (the H200
    # run of 2026-11-27 saw dense steps ~3× slower than masked ones after restores).
    fresh = engine_decode(model, 8, 512 // 16 if toy else 512, profile=True)
    out["dense_before_masks"] = {**fresh, "restored_blocks": sorted(restored_blocks)}
    report.save()
    systems = ("engine-graphs", "engine", "generate")
    points = [(m, b, c, s) for b, c in GRID for m in masks for s in systems]
    for name, batch, context, system in points:
        if deadline.passed():
            out["status"] = "partial (time)"
            return
        apply(model, masks[name])
        context = context // 16 if toy else context
        row: dict[str, Any] = {"system": system, "mask": name, "batch": batch, "context": context}
        try:
            if system == "generate":
                row.update(generate_decode(model, batch, context))
            else:
                row.update(engine_decode(model, batch, context, graphs=system == "engine-graphs"))
        except Exception as exc:  # one system failing at one shape must not end the part
            row["error"] = f"{type(exc).__name__}: {exc}"
            out["rows"].append(row)
            print(f"decode {system} {name} B={batch} C={context}: {row['error']}", flush=True)
            report.save()
            continue
        row["restored_blocks_kept"] = sum(model.mask.keeps(b) for b in restored_blocks)
        mean_context = row.get("mean_context", context + STEPS // 2)  # engine: rows as held
        read = bytes_read_per_step(model, batch, int(mean_context))
        row["bytes_read_per_step"] = read
        row["weight_share"] = memory.weight_bytes(
            model.config, model.mask, model.dtype
        ) / memory.weight_bytes(model.config, model.dense_mask(), model.dtype)
        step_s = row["ms_per_step"] / 1e3
        row["roofline_share"] = None if bw is None else read / step_s / bw
        out["rows"].append(row)
        print(
            f"decode {system:13s} {name:9s} B={batch:<3d} C={context:<5d} "
            f"{row['ms_per_step']:8.2f} ms/step {row['tokens_per_s']:9.1f} tok/s "
            f"roofline {row['roofline_share']}",
            flush=True,
        )
        report.save()
    apply(model, model.dense_mask())
    again = engine_decode(model, 8, 512 // 16 if toy else 512, profile=True)
    out["dense_after_masks"] = {**again, "restored_blocks": sorted(restored_blocks)}
    out["status"] = "done"
