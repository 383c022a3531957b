"""A hand-written residual forward: the reference that masked models are checked against.

It never uses RAP's skip. It walks the layers of an unmasked model and adds each kept branch to
the residual stream itself, with masks it builds by hand:

    x ← x + post_a(Attn(pre_a(x)))   if layer l keeps attention
    x ← x + post_m(MLP(pre_m(x)))    if layer l keeps its MLP
    logits = head(norm(x))           (soft-capped where the architecture does)
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch

from rap.core.arch import dims_of, spec_for


def causal_mask(seq: int, window: int | None, dtype: torch.dtype) -> torch.Tensor:
    """Additive (1, 1, S, S) mask: query i sees key j iff j ≤ i and i − j < window."""
    i = torch.arange(seq).unsqueeze(1)
    j = torch.arange(seq).unsqueeze(0)
    allowed = j <= i
    if window is not None:
        allowed &= (i - j) < window
    mask = torch.zeros(seq, seq, dtype=dtype)
    mask[~allowed] = torch.finfo(dtype).min
    return mask[None, None]


@torch.inference_mode()
def reference_logits(
    hf_model: torch.nn.Module, ids: torch.Tensor, attn: Sequence[bool], mlp: Sequence[bool]
) -> torch.Tensor:
    config = hf_model.config
    spec = spec_for(config)
    dims = dims_of(config)
    seq = ids.shape[1]
    pos = torch.arange(seq).unsqueeze(0)
    if config.model_type == "gpt2":
        body = hf_model.transformer
        x = body.wte(ids) + body.wpe(pos)
        final_norm = body.ln_f
    else:
        body = hf_model.model
        x = body.embed_tokens(ids)
        if config.model_type.startswith("gemma") and not hasattr(body.embed_tokens, "embed_scale"):
            x = x * torch.tensor(config.hidden_size**0.5, dtype=x.dtype)  # older transformers
        final_norm = body.norm
    for i, layer in enumerate(spec.layers(hf_model)):
        window = dims.windows[i]
        kwargs = {"attention_mask": causal_mask(seq, window, x.dtype)}
        if config.model_type != "gpt2":
            rotary = body.rotary_emb
            if "layer_type" in inspect.signature(rotary.forward).parameters:
                kwargs["position_embeddings"] = rotary(x, pos, config.layer_types[i])
            else:
                kwargs["position_embeddings"] = rotary(x, pos)
        for kind, keep in (("attn", attn[i]), ("mlp", mlp[i])):
            if not keep:
                continue
            names = spec.block_parts(kind)
            norms = [getattr(layer, n) for n in names[:-1]]
            branch = getattr(layer, names[-1])
            h = norms[0](x)
            h = branch(h, **kwargs)[0] if kind == "attn" else branch(h)
            if len(norms) > 1:
                h = norms[1](h)
            x = x + h
    logits = hf_model.lm_head(final_norm(x))
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits
