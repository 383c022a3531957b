"""What a replica knows about itself: its device memory, its budget, and its telemetry message.

Device memory comes from NVML (`nvidia-ml-py`) on a GPU, device-wide; on a CPU it is the model's
own bytes against the configured cap. `GenerateCall` is the router → replica request message.
"""

from __future__ import annotations

import collections
import os
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from rap.core.constants import GIB
from rap.serving import faults
from rap.serving.messages import DeviceMemory, ProcessMemory, QueueState, Telemetry
from rap.serving.openai_api import MAX_TOKENS_LIMIT
from rap.serving.sizing import engine_peak_bytes


class GenerateCall(BaseModel):
    """Router → replica: one request, already validated against OpenAI's shapes."""

    model_config = ConfigDict(extra="forbid")

    model: str
    prompt: str = Field("", description="Completion prompt (used when `messages` is empty).")
    messages: list[dict[str, str]] = Field(
        default_factory=list, description="Chat messages, rendered by the model's chat template."
    )
    max_tokens: int | None = Field(
        16, ge=1, le=MAX_TOKENS_LIMIT, description="None: up to the context (chat's default)."
    )
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: list[str] = Field(default_factory=list)
    seed: int | None = Field(None, description="Sampling seed: the same seed repeats a sample.")
    min_kept_fraction: float = Field(0.0, ge=0.0, le=1.0, description="The request's floor.")
    ignore_eos: bool = Field(False, description="Generate max_tokens whatever the model says.")
    timeout_s: float | None = Field(
        None, gt=0, description="Seconds from arrival after which the request ends (a 504)."
    )


def nvml_memory(device_index: int = 0) -> DeviceMemory:
    """Device-wide memory from NVML: total, used (every process) and free bytes."""
    import pynvml  # provided by nvidia-ml-py

    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
    info = pynvml.nvmlDeviceGetMemoryInfo(handle)
    uuid = pynvml.nvmlDeviceGetUUID(handle)
    return DeviceMemory(
        kind="cuda",
        device_id=uuid if isinstance(uuid, str) else uuid.decode(),
        total_bytes=int(info.total),
        used_bytes=int(info.used),
        free_bytes=int(info.free),
    )


def device_memory(model: Any, engine: Any) -> DeviceMemory:
    faults.check("device_memory")
    if model.device.type == "cuda":
        return nvml_memory(model.device.index or 0)
    own = model.weight_bytes() + engine.gauges.held_bytes
    cap = engine.budget_bytes
    return DeviceMemory(kind="cpu", total_bytes=cap, used_bytes=own, free_bytes=max(cap - own, 0))


def initial_budget_bytes(
    model: Any, budget_gib: float | None, cfg: Any, gpu_share: float = 1.0
) -> int:
    """A configured budget; else, on a GPU, own weights + `gpu_share` of (NVML free − margin),
    `gpu_share` being the replica's Ray GPU fraction (capped at 1): two replicas at 0.5 that
    start together must not both size their KV pools to all the free memory (the second's
    would not fit; the controller's `GpuShares` rebalances from there); else, on a CPU, what
    the dense model needs for a full batch of `target_seq`-token rows (no pruning to start)."""
    if budget_gib is not None:
        return int(budget_gib * GIB)
    if model.device.type == "cuda":
        free = nvml_memory(model.device.index or 0).free_bytes - int(cfg.gpu_margin_gib * GIB)
        share = min(gpu_share, 1.0) if gpu_share > 0 else 1.0
        return max(0, model.weight_bytes() + int(max(free, 0) * share))
    e = cfg.engine
    return engine_peak_bytes(model, e, model.dense_mask(), e.max_batch_size, e.target_seq)


_PEAKS: collections.deque[tuple[float, int]] = collections.deque(maxlen=256)
PEAK_WINDOW_S = 1.0
"""Each snapshot resets torch's peak; the peak reported is the most over the last second of
snapshots, so that every reader (the replica's own reporter every period, an operator's
/admin/state) sees a transient that another reader's snapshot reset."""


def process_memory(model: Any) -> ProcessMemory:
    """This process's allocator figures on the model's GPU, or only the pid on a CPU."""
    if model.device.type != "cuda":
        return ProcessMemory(pid=os.getpid())
    import torch  # lazy: heavy (torch); only a GPU replica gets here

    dev, now = model.device, time.monotonic()
    _PEAKS.append((now, torch.cuda.max_memory_allocated(dev)))
    torch.cuda.reset_peak_memory_stats(dev)
    return ProcessMemory(
        pid=os.getpid(),
        allocated_bytes=torch.cuda.memory_allocated(dev),
        peak_allocated_bytes=max(b for t, b in _PEAKS if t >= now - PEAK_WINDOW_S),
        reserved_bytes=torch.cuda.memory_reserved(dev),
    )


def predicted_bytes(engine: Any) -> int:
    """The memory model's bytes for the current mask and pool (`Sizing.bytes_with`)."""
    pages = engine.gauges.capacity_pages
    return int(engine.sizing.bytes_with(engine.model.mask, pages))


def snapshot(
    name: str, engine: Any, device: DeviceMemory, tokens_per_s: float, errors: int = 0
) -> Telemetry:
    mask = engine.model.mask
    stats, pool = engine.stats, engine.gauges  # the engine thread's last copy
    shapes = list(stats.recent_shapes)
    return Telemetry(
        replica=name,
        timestamp_s=time.time(),
        device=device,
        budget_bytes=engine.budget_bytes,
        budget_from_device=engine.budget_from_device,
        weight_bytes=engine.model.weight_bytes(),
        kv_bytes_reserved=pool.held_bytes,
        kv_bytes_in_use=pool.used_bytes,
        kv_pages_in_use=pool.used_pages,
        kv_pages_free=pool.free_pages,
        queue=QueueState(
            waiting=pool.waiting,
            running=pool.running,
            recent_batch_sizes=[b for b, _ in shapes],
            recent_longest_seqs=[s for _, s in shapes],
        ),
        mask_version=engine.version(),
        mask_source=mask.source,
        mask_ceiling=engine.ceiling.key if engine.ceiling is not None else None,
        num_layers=mask.num_layers,
        attn_kept=sum(mask.attn),
        mlp_kept=sum(mask.mlp),
        local_fallbacks=stats.local_fallbacks,
        steps=stats.steps,
        steps_on_controller_mask=stats.steps_on_controller_mask,
        preemptions=pool.preempted,
        shed=pool.shed,
        tokens_per_s=max(tokens_per_s, 0.0),
        over_budget_bytes=max(stats.over_budget_bytes, 0),
        errors=errors,
        predicted_bytes=predicted_bytes(engine),
        want_bytes=want_bytes(engine),
        process=process_memory(engine.model),
    )


def want_bytes(engine: Any) -> int:
    """The dense model with a pool in which every row of a full batch holds the whole context,
    plus one step (`engine_peak_bytes`): admission reserves no row more than the context, so
    pages beyond these are never used, and a larger budget buys the replica nothing."""
    e, model = engine.config, engine.model
    seq = engine.sizing.context_len
    return int(engine_peak_bytes(model, e, model.dense_mask(), e.max_batch_size, seq))
