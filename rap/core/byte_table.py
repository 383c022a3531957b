"""What each block frees at a workload: the memory model (`rap.core.memory`) laid out per block,
so that planners, the agent's observations and the oracle add bytes rather than re-derive them.

    bytes(mask) = base + Σ_kept attn_l + Σ_kept mlp_l,  base = resident [+ step(B, P)]
    attn_l = attention weights + kv_token · B · tokens_l(S),   mlp_l = MLP weights

Dropping the attention block of layer l frees its weights and that layer's KV cache; dropping an
MLP block frees its weights. Sums equal `rap.core.memory`'s totals exactly (tested).
step(B, P) is the activations of the engine step that feeds the batch (`memory.step_bytes`:
min(B · P, STEP_TOKENS) tokens flattened): the one activation term that every planner, the
agent's observations and scenarios, and admission share.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

from rap.core import memory
from rap.core.arch import dims_of
from rap.core.masks import Block


@dataclass(frozen=True)
class ByteTable:
    """Bytes of a workload: `base` never drops; `attn[l]`, `mlp[l]` are freed by dropping."""

    base: int
    attn: tuple[int, ...]
    mlp: tuple[int, ...]

    def of(self, block: Block) -> int:
        return (self.attn if block[0] == "attn" else self.mlp)[block[1]]

    def dense(self) -> int:
        return self.base + sum(self.attn) + sum(self.mlp)


@dataclass(frozen=True)
class _Shape:
    """What a config contributes to a byte table, in one dtype (computed once per config)."""

    resident: int
    attn: int
    mlp: int
    kv_token: int
    windows: tuple[int | None, ...]


_SHAPES: dict[tuple[int, str], tuple[weakref.ref[Any], _Shape]] = {}


def _shape(config: Any, dtype: Any) -> _Shape:
    """`rap.core.memory`'s per-block terms for `config`; cached by identity because reading a
    transformers config costs microseconds per attribute and planners must take microseconds."""
    key = (id(config), str(dtype).removeprefix("torch."))
    hit = _SHAPES.get(key)
    if hit is not None and hit[0]() is config:
        return hit[1]
    shape = _Shape(
        resident=memory.resident_bytes(config, dtype),
        attn=memory.block_bytes(config, "attn", dtype),
        mlp=memory.block_bytes(config, "mlp", dtype),
        kv_token=memory.kv_bytes_per_token(config, dtype),
        windows=dims_of(config).windows,
    )
    if len(_SHAPES) > 256:
        _SHAPES.clear()
    _SHAPES[key] = (weakref.ref(config), shape)
    return shape


def byte_table(
    config: Any,
    batch: int,
    seq: int,
    dtype: Any,
    include_activations: bool = False,
    prefill_tokens: int | None = None,
) -> ByteTable:
    """Per-block bytes at (B, S) from `rap.core.memory`'s own terms, so sums equal its totals:
    attn_l = attn weights + kv_token · B · tokens_l(S);  mlp_l = MLP weights."""
    sh = _shape(config, dtype)
    attn = tuple(sh.attn + sh.kv_token * batch * memory.kv_tokens(w, seq) for w in sh.windows)
    base = sh.resident
    if include_activations:
        base += memory.step_bytes(config, batch, prefill_tokens or seq, dtype)
    return ByteTable(base, attn, (sh.mlp,) * len(sh.windows))


def predicted_bytes(
    config: Any,
    mask: memory.MaskLike,
    batch: int,
    seq: int,
    dtype: Any,
    *,
    include_activations: bool = False,
    prefill_tokens: int | None = None,
) -> int:
    """weights(mask) + kv(mask, B, S) [+ step(B, prefill_tokens or S), the engine's step]."""
    total = memory.weight_bytes(config, mask, dtype) + memory.kv_bytes(
        config, mask, batch, seq, dtype
    )
    if include_activations:
        total += memory.step_bytes(config, batch, prefill_tokens or seq, dtype)
    return total


def fits(
    config: Any,
    mask: memory.MaskLike,
    budget_bytes: int,
    batch: int,
    seq: int,
    dtype: Any,
    *,
    include_activations: bool = False,
    prefill_tokens: int | None = None,
) -> bool:
    """Whether `mask`'s predicted bytes at (B, S) are within `budget_bytes`."""
    used = predicted_bytes(
        config,
        mask,
        batch,
        seq,
        dtype,
        include_activations=include_activations,
        prefill_tokens=prefill_tokens,
    )
    return used <= budget_bytes
