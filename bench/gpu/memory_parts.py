"""Parts 1 and 2 of the GPU run: the memory model against the allocator, and blocks that leave
and come back.

1. `memory`: predicted bytes against `torch.cuda.max_memory_allocated` on a grid disjoint from
   `bench/memory_peak.py`'s (the activation formula is analytic, nothing is fitted), for
   - generate(): `rap.core.memory.peak_bytes` = weights + KV + max(activations, KV growth);
   - the engine (`rap.serving.scheduler`): `rap.serving.sizing.engine_peak_bytes` = weights +
     the page pool sized for the rows + one step's activations.
   error = (predicted − measured) / measured; target |error| ≤ 5 %.
2. `blocks`: one attention and one MLP block dropped and restored, three times each: bytes freed
   by `memory_allocated` and by NVML against `rap.core.memory.block_bytes`, the restore's
   parameters bit-identical to before, and the restore's rate (bytes / time of `apply`, the
   pinned host→device copy and the binding) against the measured pinned host→device bandwidth
   (target ≥ 80 %).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from budget import Deadline
from common import (
    allocated_bytes,
    apply,
    copy_bandwidth,
    cuda,
    mask_keeping,
    nvml_used_bytes,
    prompt_ids,
    sync,
)

from rap.core import memory
from rap.serving.engine_config import EngineConfig
from rap.serving.kv_pages import PagePool
from rap.serving.rows import Request
from rap.serving.scheduler import Scheduler
from rap.serving.sizing import engine_peak_bytes

GENERATE_GRID = [(2, 384), (8, 1536), (24, 384), (2, 1536), (24, 1536), (8, 384)]
ENGINE_GRID = [(8, 640), (32, 1800), (1, 1800), (32, 640), (8, 1800), (1, 640)]
NEW_TOKENS = 8


def _reset() -> None:
    if cuda():
        sync()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _row(predicted: int, measured: int | None, **keys: Any) -> dict[str, Any]:
    error = None if measured is None else (predicted - measured) / measured
    return {**keys, "predicted": predicted, "measured": measured, "error": error}


def generate_point(model: Any, batch: int, prompt: int) -> dict[str, Any]:
    cfg, dt, mask = model.config, model.dtype, model.mask
    predicted = memory.peak_bytes(
        cfg, mask, batch, prompt + NEW_TOKENS - 1, dt, prefill_tokens=prompt
    )
    ids = [prompt_ids(model, prompt, r) for r in range(batch)]
    _reset()
    model.generate_ids(ids, NEW_TOKENS, stop_at_eos=False)
    sync()
    measured = torch.cuda.max_memory_allocated() if cuda() else None
    return _row(predicted, measured, path="generate", batch=batch, prompt=prompt)


def engine_point(model: Any, batch: int, seq: int) -> dict[str, Any]:
    """`batch` rows of `seq` tokens (a prompt of seq − NEW_TOKENS, then NEW_TOKENS generated:
    a row reserves its prompt + max_tokens) through a scheduler whose pool is sized the way a
    replica sizes it."""
    config = EngineConfig(max_batch_size=batch, target_seq=seq, max_wait_s=600)
    d, mask = model.dims, model.mask
    per_row = max(
        memory.kv_row_pages(w, seq, config.page_tokens, config.max_step_tokens) for w in d.windows
    )
    predicted = engine_peak_bytes(model, config, mask, batch, seq)
    kept = [i for i, k in enumerate(mask.attn) if k]
    _reset()
    pool = PagePool(
        kept,
        batch * per_row,
        config.page_tokens,
        d.kv_heads,
        d.head_dim,
        model.dtype,
        model.device,
    )
    sched = Scheduler(model, pool, config.scheduler())
    done: list[dict[str, Any]] = []
    prompt = seq - NEW_TOKENS
    for r in range(batch):
        ids = prompt_ids(model, prompt, r)
        sched.add(Request(ids, NEW_TOKENS, ignore_eos=True), done.append)
    while not sched.idle:
        sched.step()
    sync()
    measured = torch.cuda.max_memory_allocated() if cuda() else None
    errors = [e for e in done if e["type"] == "error"]
    if errors:
        raise RuntimeError(f"engine rows failed: {errors[0]['message']}")
    del pool, sched
    return _row(predicted, measured, path="engine", batch=batch, seq=seq)


def part_memory(model: Any, report: Any, deadline: Deadline, toy: bool) -> None:
    out = report.part("memory")
    masks = {"dense": model.dense_mask(), "keep-80%": mask_keeping(model, 0.8)}
    masks["keep-60%"] = mask_keeping(model, 0.6)
    scale = 8 if toy else 1  # the dry run's toy grid: same code, small shapes
    points = [("engine", m, b, s) for b, s in ENGINE_GRID for m in masks]
    points += [("generate", m, b, p) for b, p in GENERATE_GRID for m in masks]
    for path, name, batch, tokens in points:
        if deadline.passed():
            out["status"] = "partial (time)"
            return
        apply(model, masks[name])
        tokens = max(tokens // scale, NEW_TOKENS + 1)
        point = engine_point if path == "engine" else generate_point
        row = {"mask": name, **point(model, batch, tokens)}
        out["rows"].append(row)
        print(f"memory {path:8s} {name:9s} B={batch:<3d} T={tokens:<5d} " + _mib(row), flush=True)
        report.save()
    apply(model, model.dense_mask())
    errors = [abs(r["error"]) for r in out["rows"] if r["error"] is not None]
    out["max_abs_error"] = max(errors, default=None)
    out["status"] = "done"


def _mib(row: dict[str, Any]) -> str:
    m = row["measured"]
    text = f"predicted {row['predicted'] / 2**20:9.1f} MiB"
    if m is None:
        return text + "  measured n/a (no CUDA)"
    return text + f"  measured {m / 2**20:9.1f} MiB  error {row['error']:+.2%}"


def _block_params(model: Any, kind: str, layer: int) -> list[torch.Tensor]:
    module = model.spec.layers(model.hf)[layer]
    return [
        p.detach().clone()
        for part in model.spec.block_parts(kind)
        for p in getattr(module, part).parameters()
    ]


def block_cycle(model: Any, kind: str, layer: int) -> dict[str, Any]:
    """Drop one block and restore it; bytes freed, times, and the bits after the round trip."""
    before = _block_params(model, kind, layer)
    dense = model.dense_mask()
    drop = dense.model_copy(update={kind: tuple(i != layer for i in range(model.num_layers))})
    sync()
    a0, n0 = allocated_bytes(), nvml_used_bytes()
    start = time.perf_counter()
    released = apply(model, drop).released_bytes
    sync()
    drop_s = time.perf_counter() - start
    a1, n1 = allocated_bytes(), nvml_used_bytes()
    start = time.perf_counter()
    restored = apply(model, dense).restored_bytes
    sync()
    restore_s = time.perf_counter() - start
    after = _block_params(model, kind, layer)
    identical = all(torch.equal(x, y) for x, y in zip(before, after, strict=True))
    return {
        "kind": kind,
        "layer": layer,
        "predicted_bytes": memory.block_bytes(model.config, kind, model.dtype),
        "released_bytes": released,
        "freed_allocated_bytes": None if a0 is None or a1 is None else a0 - a1,
        "freed_nvml_bytes": None if n0 is None or n1 is None else n0 - n1,
        "drop_s": drop_s,
        "restore_s": restore_s,
        "restored_bytes": restored,
        "restore_bytes_per_s": restored / restore_s,
        "bit_identical": identical,
    }


def part_blocks(model: Any, report: Any, deadline: Deadline, toy: bool) -> None:
    out = report.part("blocks")
    layer = model.num_layers // 3
    largest = max(memory.block_bytes(model.config, k, model.dtype) for k in ("attn", "mlp"))
    out["bandwidth"] = copy_bandwidth(largest)
    h2d = out["bandwidth"]["h2d_pinned_bytes_per_s"]
    for _ in range(3):
        for kind in ("attn", "mlp"):
            if deadline.passed():
                out["status"] = "partial (time)"
                return
            row = block_cycle(model, kind, layer)
            row["restore_share_of_h2d"] = None if h2d is None else row["restore_bytes_per_s"] / h2d
            out["rows"].append(row)
            print(
                f"blocks {kind:4s} L{layer}: predicted {row['predicted_bytes'] / 2**20:.1f} MiB, "
                f"freed alloc {row['freed_allocated_bytes']}, nvml {row['freed_nvml_bytes']}, "
                f"restore {row['restore_bytes_per_s'] / 1e9:.2f} GB/s "
                f"(share of pinned H2D {row['restore_share_of_h2d']}), "
                f"identical {row['bit_identical']}",
                flush=True,
            )
            report.save()
    out["status"] = "done"
