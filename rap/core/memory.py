"""The memory model: bytes that a (mask, batch, sequence length) needs, before anything runs.

Pure functions of a transformers config, a keep-mask, (batch, seq) and a dtype; never of live
tensors. Units are in the names. Notation: L layers, H hidden size, I MLP width, V vocabulary,
n_h query heads, n_kv key/value heads, d head size, b bytes per element of the serving dtype,
B batch size, S tokens per sequence (prompt + generated).

    weights(mask)       = resident + Σ_kept attn blocks + Σ_kept mlp blocks      (see rap.core.arch)
    kv(mask, B, S)      = Σ_kept attn layers l  2 · n_kv · d · B · tokens_l(S) · b
    tokens_l(S)         = S for full attention; min(S, W_l − 1) for a layer with sliding window
                          W_l (transformers' caches keep the last W − 1 tokens between steps)
    activations(B, S)   = b · B · S · (2H + max(attn_width, mlp_width)) + scores + logits
    peak(mask, B, S, P) = weights(mask) + kv(mask, B, S) + max(activations(B, P), kv_growth)
                          (P prompt tokens; kv_growth: one layer's KV, copied as it grows)

The budget: `--budget-frac F` at (B, S) is F × (weights + kv) of the dense model at
(B, S) in the serving dtype; activations are excluded from the budget's definition and counted
at admission (`peak`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from rap.core.arch import Dims, dims_of, spec_for
from rap.core.constants import STEP_TOKENS

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
LOGITS_BYTES_PER_ELEMENT = 4
"""Generation upcasts the last position's logits to float32 before choosing a token."""


class MaskLike(Protocol):
    @property
    def attn(self) -> Sequence[bool]: ...
    @property
    def mlp(self) -> Sequence[bool]: ...


def dtype_bytes(dtype: Any) -> int:
    """Bytes per element of a dtype given as a string (`"float16"`) or a torch dtype."""
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPE_BYTES)}")
    return DTYPE_BYTES[name]


def block_bytes(config: Any, kind: str, dtype: Any) -> int:
    """Bytes of one attention (`kind="attn"`) or MLP (`"mlp"`) block, its norms included."""
    return spec_for(config).block_params(config, dims_of(config), kind) * dtype_bytes(dtype)


def resident_bytes(config: Any, dtype: Any) -> int:
    """Bytes that never drop: embeddings, final norm, LM head unless tied (positions for GPT-2)."""
    return spec_for(config).resident_params(config, dims_of(config)) * dtype_bytes(dtype)


def weight_bytes(config: Any, mask: MaskLike, dtype: Any) -> int:
    """weights(mask) = resident + Σ_kept attn · attn_block + Σ_kept mlp · mlp_block."""
    return (
        resident_bytes(config, dtype)
        + sum(mask.attn) * block_bytes(config, "attn", dtype)
        + sum(mask.mlp) * block_bytes(config, "mlp", dtype)
    )


def kv_tokens(window: int | None, seq: int) -> int:
    """Tokens a layer's cache keeps after `seq` tokens: S, or min(S, W − 1) with a window W."""
    return seq if window is None else min(seq, window - 1)


def kv_bytes(config: Any, mask: MaskLike, batch: int, seq: int, dtype: Any) -> int:
    """kv(mask, B, S) = Σ_kept attn layers l  2 · n_kv · d · B · tokens_l(S) · b."""
    d = dims_of(config)
    per_token = 2 * d.kv_heads * d.head_dim * batch * dtype_bytes(dtype)
    return sum(
        per_token * kv_tokens(window, seq)
        for window, kept in zip(d.windows, mask.attn, strict=True)
        if kept
    )


def kv_bytes_per_token(config: Any, dtype: Any) -> int:
    """KV bytes one token costs in one full-attention layer: 2 · n_kv · d · b."""
    d = dims_of(config)
    return 2 * d.kv_heads * d.head_dim * dtype_bytes(dtype)


def kv_page_bytes(config: Any, dtype: Any, page_tokens: int) -> int:
    """One KV page of one attention layer: keys and values of `page_tokens` tokens,
    2 · n_kv · d · b · P."""
    return kv_bytes_per_token(config, dtype) * page_tokens


def kv_pool_bytes(config: Any, mask: MaskLike, dtype: Any, page_tokens: int, pages: int) -> int:
    """A page pool of `pages` pages per kept attention layer:
    Σ_kept attn layers  pages · kv_page_bytes(P)."""
    return sum(mask.attn) * pages * kv_page_bytes(config, dtype, page_tokens)


def kv_row_pages(window: int | None, tokens: int, page_tokens: int, chunk: int) -> int:
    """Pages one row of `tokens` tokens can hold at once in a layer: ⌈S / P⌉ for full
    attention; with a window W the pages behind it are handed back after each step, and during
    a step of up to `chunk` new tokens a row holds at most W − 1 + chunk tokens beyond a page
    boundary: min(⌈S / P⌉, ⌈(W − 1 + chunk) / P⌉ + 1)."""
    full = -(-tokens // page_tokens)
    if window is None:
        return full
    return min(full, -(-(window - 1 + chunk) // page_tokens) + 1)


def activation_bytes(
    config: Any, batch: int, seq: int, dtype: Any, scores_materialized: bool = False
) -> int:
    """Largest transient set of one prefill step, estimated from shapes.

    activations(B, S) = b · B · S · (2H + max(attn_width, mlp_width)) + scores + logits, where
    2H is the residual stream and its normed copy; attn_width = n_h·d (queries) + 2·n_kv·d (new
    keys and values) + 2·n_h·d (keys and values repeated for grouped-query attention) + n_h·d
    (output); mlp_width = 3·I (gate, up, and their product); scores = b · B · n_h · S² when the
    attention kernel materialises them (eager attention), else 0; logits = 2 · B · V · 4 (the
    last position only, float32, and the copy that sampling makes).
    """
    d = dims_of(config)
    b = dtype_bytes(dtype)
    attn_width = 4 * d.heads * d.head_dim + 2 * d.kv_heads * d.head_dim
    mlp_width = 3 * d.intermediate
    per_token = b * (2 * d.hidden + max(attn_width, mlp_width))
    scores = b * batch * d.heads * seq * seq if scores_materialized else 0
    logits = 2 * batch * d.vocab * LOGITS_BYTES_PER_ELEMENT
    return batch * seq * per_token + scores + logits


def step_activation_bytes(config: Any, step_tokens: int, rows: int, dtype: Any) -> int:
    """The transient set of one engine step: `step_tokens` tokens of several rows flattened
    into one sequence, with logits at one position per row: activations(1, T) (one position's
    logits) + (rows − 1) · 2 · V · 4 for the other rows' logits."""
    extra_logits = 2 * max(rows - 1, 0) * dims_of(config).vocab * LOGITS_BYTES_PER_ELEMENT
    return activation_bytes(config, 1, step_tokens, dtype) + extra_logits


def step_bytes(
    config: Any, batch: int, prefill_tokens: int, dtype: Any, step_tokens: int = STEP_TOKENS
) -> int:
    """The activation term of the one byte accounting (planners, the agent's observations and
    scenarios, admission): the engine step that feeds B rows of P-token prompts carries
    T = min(B · P, step_tokens) tokens flattened, with logits for the B rows:
    step(B, P) = step_activation_bytes(T, B). (`peak_bytes` is `generate()`'s peak, which
    prefills whole prompts at once: not what the engine runs.)"""
    tokens = max(1, min(batch * prefill_tokens, step_tokens))
    return step_activation_bytes(config, tokens, batch, dtype)


def kv_growth_bytes(config: Any, mask: MaskLike, batch: int, seq: int, dtype: Any) -> int:
    """The largest single layer's KV: a dynamic cache grows by concatenation, so while one layer
    appends a token its old and new key/value tensors are both alive for a moment."""
    d = dims_of(config)
    per_token = 2 * d.kv_heads * d.head_dim * batch * dtype_bytes(dtype)
    sizes = [per_token * kv_tokens(w, seq) for w, k in zip(d.windows, mask.attn, strict=True) if k]
    return max(sizes, default=0)


def peak_bytes(
    config: Any,
    mask: MaskLike,
    batch: int,
    seq: int,
    dtype: Any,
    prefill_tokens: int | None = None,
    scores_materialized: bool = False,
) -> int:
    """peak = weights(mask) + kv(mask, B, S) + max(activations(B, P), kv_growth(mask, B, S)).

    S is the batch's whole length (prompt + max_tokens) and P the prompt length (default S):
    the prefill's activations and a decode step's cache growth do not coexist.
    """
    act = activation_bytes(config, batch, prefill_tokens or seq, dtype, scores_materialized)
    return (
        weight_bytes(config, mask, dtype)
        + kv_bytes(config, mask, batch, seq, dtype)
        + max(act, kv_growth_bytes(config, mask, batch, seq, dtype))
    )


class _Dense:
    def __init__(self, n: int) -> None:
        self.attn = (True,) * n
        self.mlp = (True,) * n


def dense_mask(config: Any) -> MaskLike:
    """A mask-like object that keeps every block (no model identity needed)."""
    return _Dense(dims_of(config).num_layers)


def budget_bytes(config: Any, fraction: float, batch: int, seq: int, dtype: Any) -> int:
    """The budget: F × (weights + kv) of the dense model at (B, S); activations excluded."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"budget fraction {fraction} is outside (0, 1]")
    dense = dense_mask(config)
    full = weight_bytes(config, dense, dtype) + kv_bytes(config, dense, batch, seq, dtype)
    return int(fraction * full)


def describe(config: Any, dtype: Any) -> dict[str, Any]:
    """What `rap info` prints: layer count and the bytes of each kind of block, in `dtype`."""
    d: Dims = dims_of(config)
    return {
        "model_type": config.model_type,
        "num_layers": d.num_layers,
        "dtype": str(dtype).removeprefix("torch."),
        "hidden_size": d.hidden,
        "heads": d.heads,
        "kv_heads": d.kv_heads,
        "head_dim": d.head_dim,
        "attn_block_bytes": block_bytes(config, "attn", dtype),
        "mlp_block_bytes": block_bytes(config, "mlp", dtype),
        "resident_bytes": resident_bytes(config, dtype),
        "dense_weight_bytes": weight_bytes(config, dense_mask(config), dtype),
        "kv_bytes_per_token_per_layer": kv_bytes_per_token(config, dtype),
        "kv_bytes_per_token": kv_bytes(config, dense_mask(config), 1, 1, dtype),
        "sliding_windows": list(d.windows),
    }
