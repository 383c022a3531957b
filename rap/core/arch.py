"""Where the blocks are in each supported architecture, and how many parameters each one holds.

A decoder layer is two residual branches, `x + post(branch(pre(x)))`, one attention and one MLP.
A *block* is one branch together with the norms that only it uses (its pre-norm, and its
post-norm where the architecture has one: Gemma 2/3). Dropping a block removes the whole branch,
so the residual stream passes that point unchanged.

Parameter counts are formulas of the config alone (no tensors), used by `rap.core.memory`; tests
check them against real models' tensors for every architecture. Notation: H hidden size,
I MLP width, V vocabulary, n_h query heads, n_kv key/value heads, d head size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rap.core.errors import UnsupportedModelError


@dataclass(frozen=True)
class Dims:
    """The shape numbers that the memory model needs, read once from a config."""

    num_layers: int
    hidden: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool
    windows: tuple[int | None, ...]
    """Per layer: the sliding window in tokens, or None for full attention."""
    max_positions: int = 0


@dataclass(frozen=True)
class ArchSpec:
    """How to find one architecture's blocks and count their parameters."""

    model_types: tuple[str, ...]
    layers_path: str
    attn_name: str
    mlp_name: str
    attn_norms: tuple[str, ...]
    mlp_norms: tuple[str, ...]
    attn_params: Callable[[Any, Dims], int]
    mlp_params: Callable[[Any, Dims], int]
    norm_params: Callable[[Dims], int]
    resident_params: Callable[[Any, Dims], int]

    def layers(self, model: Any) -> Any:
        obj = model
        for part in self.layers_path.split("."):
            obj = getattr(obj, part)
        return obj

    def block_parts(self, kind: str) -> tuple[str, ...]:
        """Attribute names, on the decoder layer, of the modules a block owns (norms first)."""
        if kind == "attn":
            return (*self.attn_norms, self.attn_name)
        return (*self.mlp_norms, self.mlp_name)

    def block_params(self, config: Any, dims: Dims, kind: str) -> int:
        """Parameters of one block of `kind`, its norms included."""
        branch = self.attn_params if kind == "attn" else self.mlp_params
        norms = self.attn_norms if kind == "attn" else self.mlp_norms
        return branch(config, dims) + len(norms) * self.norm_params(dims)


def _qkvo(config: Any, d: Dims, qkv_bias: bool, o_bias: bool, qk_norm: bool) -> int:
    """Separate q/k/v/o projections: H·n_h·d + 2·H·n_kv·d + n_h·d·H (+ biases, + q/k norms)."""
    q, kv = d.heads * d.head_dim, d.kv_heads * d.head_dim
    n = d.hidden * q + 2 * d.hidden * kv + q * d.hidden
    n += (q + 2 * kv) if qkv_bias else 0
    n += d.hidden if o_bias else 0
    n += 2 * d.head_dim if qk_norm else 0
    return n


def _gated_mlp(config: Any, d: Dims) -> int:
    """gate, up: H·I each; down: I·H (+ biases when `mlp_bias`)."""
    n = 3 * d.hidden * d.intermediate
    if getattr(config, "mlp_bias", False):
        n += 2 * d.intermediate + d.hidden
    return n


def _rms(d: Dims) -> int:
    return d.hidden


def _embeddings(config: Any, d: Dims) -> int:
    """Embeddings V·H, final norm H, and an LM head V·H unless tied to the embeddings."""
    return d.vocab * d.hidden + d.hidden + (0 if d.tied else d.vocab * d.hidden)


def _llama_attn(c: Any, d: Dims) -> int:
    bias = bool(getattr(c, "attention_bias", False))
    return _qkvo(c, d, bias, bias, qk_norm=False)


def _qwen2_attn(c: Any, d: Dims) -> int:
    return _qkvo(c, d, qkv_bias=True, o_bias=False, qk_norm=False)


def _qknorm_attn(c: Any, d: Dims) -> int:
    bias = bool(getattr(c, "attention_bias", False))
    return _qkvo(c, d, bias, bias, qk_norm=True)


def _phi3_attn(c: Any, d: Dims) -> int:
    """Fused qkv: H·(n_h + 2·n_kv)·d, then o: n_h·d·H; no biases."""
    return d.hidden * (d.heads + 2 * d.kv_heads) * d.head_dim + d.heads * d.head_dim * d.hidden


def _phi3_mlp(c: Any, d: Dims) -> int:
    """Fused gate_up: H·2I, down: I·H; no biases."""
    return 3 * d.hidden * d.intermediate


def _gpt2_attn(c: Any, d: Dims) -> int:
    """c_attn: H·3H + 3H, c_proj: H·H + H."""
    return 3 * d.hidden * d.hidden + 3 * d.hidden + d.hidden * d.hidden + d.hidden


def _gpt2_mlp(c: Any, d: Dims) -> int:
    """c_fc: H·I + I, c_proj: I·H + H (I = n_inner or 4H)."""
    return 2 * d.hidden * d.intermediate + d.intermediate + d.hidden


def _gpt2_resident(c: Any, d: Dims) -> int:
    """wte V·H, wpe P·H, ln_f 2H; the LM head is tied to wte."""
    return d.vocab * d.hidden + d.max_positions * d.hidden + 2 * d.hidden


_LLAMA_LIKE = {
    "layers_path": "model.layers",
    "attn_name": "self_attn",
    "mlp_name": "mlp",
    "attn_norms": ("input_layernorm",),
    "mlp_norms": ("post_attention_layernorm",),
    "mlp_params": _gated_mlp,
    "norm_params": _rms,
    "resident_params": _embeddings,
}
_GEMMA_LIKE = {
    **_LLAMA_LIKE,
    "attn_norms": ("input_layernorm", "post_attention_layernorm"),
    "mlp_norms": ("pre_feedforward_layernorm", "post_feedforward_layernorm"),
}

ARCHS: tuple[ArchSpec, ...] = (
    ArchSpec(model_types=("llama", "mistral"), attn_params=_llama_attn, **_LLAMA_LIKE),  # type: ignore[arg-type]
    ArchSpec(model_types=("qwen2",), attn_params=_qwen2_attn, **_LLAMA_LIKE),  # type: ignore[arg-type]
    ArchSpec(model_types=("qwen3",), attn_params=_qknorm_attn, **_LLAMA_LIKE),  # type: ignore[arg-type]
    ArchSpec(model_types=("gemma2",), attn_params=_llama_attn, **_GEMMA_LIKE),  # type: ignore[arg-type]
    ArchSpec(model_types=("gemma3_text",), attn_params=_qknorm_attn, **_GEMMA_LIKE),  # type: ignore[arg-type]
    ArchSpec(
        model_types=("phi3",),
        **{**_LLAMA_LIKE, "attn_params": _phi3_attn, "mlp_params": _phi3_mlp},  # type: ignore[arg-type]
    ),
    ArchSpec(
        model_types=("gpt2",),
        layers_path="transformer.h",
        attn_name="attn",
        mlp_name="mlp",
        attn_norms=("ln_1",),
        mlp_norms=("ln_2",),
        attn_params=_gpt2_attn,
        mlp_params=_gpt2_mlp,
        norm_params=lambda d: 2 * d.hidden,
        resident_params=_gpt2_resident,
    ),
)
SUPPORTED = tuple(t for a in ARCHS for t in a.model_types)


def spec_for(config: Any) -> ArchSpec:
    """The `ArchSpec` of a config, or `UnsupportedModelError` naming what is supported."""
    model_type = getattr(config, "model_type", None)
    for arch in ARCHS:
        if model_type in arch.model_types:
            if getattr(config, "add_cross_attention", False):
                break
            return arch
    raise UnsupportedModelError(
        f"model type {model_type!r} is not supported for block pruning",
        expected=f"one of {', '.join(SUPPORTED)} (decoder-only, no cross-attention)",
        fix="open an issue with the model's config.json",
    )


def dims_of(config: Any) -> Dims:
    """Read the shape numbers from a transformers config (any supported architecture)."""
    spec_for(config)
    if config.model_type == "gpt2":
        hidden = config.n_embd
        return Dims(
            num_layers=config.n_layer,
            hidden=hidden,
            intermediate=config.n_inner or 4 * hidden,
            vocab=config.vocab_size,
            heads=config.n_head,
            kv_heads=config.n_head,
            head_dim=hidden // config.n_head,
            tied=True,
            windows=(None,) * config.n_layer,
            max_positions=config.n_positions,
        )
    heads = config.num_attention_heads
    return Dims(
        num_layers=config.num_hidden_layers,
        hidden=config.hidden_size,
        intermediate=config.intermediate_size,
        vocab=config.vocab_size,
        heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        tied=bool(getattr(config, "tie_word_embeddings", False)),
        windows=layer_windows(config),
    )


def layer_windows(config: Any) -> tuple[int | None, ...]:
    """Per layer, the sliding window transformers' cache applies (None: full attention).

    Follows `DynamicCache(config=...)`: with `layer_types`, layers typed `sliding_attention`
    slide; without them, a set `sliding_window` makes every layer slide (Mistral, Phi-3).
    """
    n = config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types is not None:
        return tuple(window if t == "sliding_attention" else None for t in types)
    return (window,) * n if window else (None,) * n
