"""What every part of the GPU run shares: the device's facts, the models, masks and clocks.

The 7B-shaped model is Llama-2-7B's shape with random weights (bytes and time do not depend on
the values); `--dry-run` builds the same architecture at a toy size on the CPU, so that every
code path runs before GPU time is spent.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

from rap.core import memory
from rap.core.masks import KeepMask
from rap.core.random_models import PRESETS

LLAMA_7B, TOY = PRESETS["llama-7b"], PRESETS["toy"]  # the shapes `rap serve` knows too


class Silent:
    """The random model's tokenizer: it has no vocabulary, so its text is empty (the engine
    decodes each token for streaming; the benchmarks count tokens, never read text)."""

    chat_template = None

    def decode(self, ids: list[int], **kwargs: Any) -> str:
        return ""


def cuda() -> bool:
    return torch.cuda.is_available()


def sync() -> None:
    if cuda():
        torch.cuda.synchronize()


def allocated_bytes() -> int | None:
    return torch.cuda.memory_allocated() if cuda() else None


def nvml_used_bytes() -> int | None:
    """Device-wide used bytes from NVML (every process), None without CUDA."""
    if not cuda():
        return None
    from rap.serving.telemetry import nvml_memory

    return nvml_memory(torch.cuda.current_device()).used_bytes


def environment() -> dict[str, Any]:
    """Device, driver, torch/CUDA/transformers versions and the commit measured."""
    import transformers

    env: dict[str, Any] = {
        "cuda": cuda(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "commit": _git_commit(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if cuda():
        import pynvml

        pynvml.nvmlInit()
        props = torch.cuda.get_device_properties(0)
        env.update(
            device=torch.cuda.get_device_name(0),
            driver=pynvml.nvmlSystemGetDriverVersion(),
            total_bytes=props.total_memory,
            multiprocessors=props.multi_processor_count,
        )
    else:
        env["device"] = f"cpu ({platform.machine()}): CUDA is absent, nothing is measured"
    return env


def _git_commit() -> str | None:
    """`RAP_COMMIT` when the caller names it (the device machine's copy of `.git` can lag the
    working tree it runs: its HEAD read 0cfc288 on 2026-11-27 while the tree was 45a320e),
    else git's HEAD."""
    if os.environ.get("RAP_COMMIT"):
        return os.environ["RAP_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
        return out.stdout.strip() or None
    except OSError:
        return None


def random_llama(toy: bool, dtype: torch.dtype = torch.bfloat16) -> Any:
    """A `PrunableModel` of Llama-2-7B's shape (or `TOY`'s) with random weights, on the GPU
    (or the CPU in a dry run), built in `dtype` directly (no float32 copy)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from rap.core.model import PrunableModel

    device = "cuda" if cuda() else "cpu"
    config = LlamaConfig(**(TOY if toy else LLAMA_7B))
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            hf = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(before)
    name = "llama-toy-random" if toy else "llama-7b-shaped-random"
    return PrunableModel(hf, name, None, Silent(), device)


def mask_keeping(model: Any, share: float) -> KeepMask:
    """A mask whose weights are at most `share` of the dense weights: blocks dropped from the
    second-to-last layer downwards, MLP before attention in each layer (the values are random,
    so which blocks go does not matter for bytes or time; the last layer and the first two stay
    as every planner keeps them)."""
    n, cfg, dt = model.num_layers, model.config, model.dtype
    dense = memory.weight_bytes(cfg, model.dense_mask(), dt)
    attn, mlp = [True] * n, [True] * n
    order = [(kind, layer) for layer in range(n - 2, 1, -1) for kind in ("mlp", "attn")]
    for kind, layer in order:
        mask = KeepMask(model=model.model_id, source="user", attn=tuple(attn), mlp=tuple(mlp))
        if memory.weight_bytes(cfg, mask, dt) <= share * dense:
            break
        (mlp if kind == "mlp" else attn)[layer] = False
    return KeepMask(model=model.model_id, source="user", attn=tuple(attn), mlp=tuple(mlp))


def prompt_ids(model: Any, tokens: int, row: int) -> list[int]:
    """A deterministic prompt of `tokens` ids, different per row, inside the vocabulary."""
    span = min(model.dims.vocab - 10, 1000)
    return [5 + (i * 7 + row) % span for i in range(tokens)]


restored_blocks: set[tuple[str, int]] = set()
"""Blocks this process has restored at least once (their buffers are no longer the ones the
model was built with): the decode part reports how many of a mask's blocks are such."""


def apply(model: Any, mask: KeepMask) -> Any:
    """Make `mask` current at the model's mask version (benchmarks switch freely)."""
    change = model.apply(mask.model_copy(update={"version": model.mask.version}))
    restored_blocks.update(change.restored)
    return change


def copy_bandwidth(nbytes: int, repeats: int = 5) -> dict[str, float | None]:
    """Measured bandwidths, best of `repeats`: device-to-device (a copy reads and writes each
    byte, so bandwidth = 2 · bytes / time) and pinned host→device (bytes / time)."""
    if not cuda():
        return {"d2d_bytes_per_s": None, "h2d_pinned_bytes_per_s": None}
    d2d, h2d = _copy_times(nbytes, repeats)
    torch.cuda.empty_cache()  # the buffers died with _copy_times
    return {"d2d_bytes_per_s": 2 * nbytes / min(d2d), "h2d_pinned_bytes_per_s": nbytes / min(h2d)}


def _copy_times(nbytes: int, repeats: int) -> tuple[list[float], list[float]]:
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    d2d = [_timed(lambda: dst.copy_(src)) for _ in range(repeats)]
    h2d = [_timed(lambda: dst.copy_(host, non_blocking=True)) for _ in range(repeats)]
    return d2d, h2d


def _timed(fn: Any) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


class Report:
    """The run's JSON, rewritten after every point so that a run cut off returns what it had."""

    def __init__(self, path: Path, env: dict[str, Any]) -> None:
        self.path = path
        self.data: dict[str, Any] = {"format": "rap-gpu-run/1", "env": env, "parts": {}}
        self.save()

    def part(self, name: str) -> dict[str, Any]:
        return self.data["parts"].setdefault(name, {"status": "running", "rows": []})

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        tmp.replace(self.path)
