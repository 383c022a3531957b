"""One batched forward for rows of different lengths, over paged KV, without forking a model.

A step flattens every running row's new tokens into one sequence (batch dimension 1): a
decoding row contributes one token, a prefilling row a chunk of its prompt. Each token carries
its own position (`position_ids`), so rotary and learned position embeddings are the row's own.
The model runs with its attention implementation set to `rap_paged` (registered through
transformers' `AttentionInterface`, the way vLLM and TGI plug in): each attention layer first
hands its new keys and values to `PagedKV.update`, which appends them to the row's pages, then
calls `paged_attention`, which attends row by row over that row's pages only:

    out_r = softmax(q_r · K_rᵀ · scale + mask_r) · V_r,   K_r, V_r = the row's pages in layer l
    mask_r[i, j] = 0 if pos(j) ≤ pos(i) and (no window or pos(i) − pos(j) < W), else −∞

(tanh soft-capping of the scores where the model has it, Gemma 2). Rows never see each other,
there is no padding, and a layer whose attention block is dropped is never called, so it holds
no pages. transformers builds no mask for an attention implementation it has no mask function
for, so nothing else of the model changes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from rap.serving.kv_pages import PagePool, RowPages

IMPLEMENTATION = "rap_paged"


@dataclass
class RowStep:
    """One row's part of a step: its pages per layer and its tokens in the flat sequence."""

    pages: dict[int, RowPages]
    offset: int
    """Index of the row's first new token in the step's flat sequence."""
    count: int
    """New tokens of the row in this step (1 when decoding, a chunk when prefilling)."""
    first_pos: int
    """Position of the row's first new token (= tokens it held before the step)."""


@dataclass
class PagedKV:
    """What the model sees as `past_key_values` during one step (module doc)."""

    pool: PagePool
    rows: list[RowStep]
    windows: tuple[int | None, ...]
    """Per layer, the sliding window in tokens (None: full attention), from `rap.core.arch`."""
    written: set[int] = field(default_factory=set)

    def update(
        self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args: Any, **kw: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the step's keys and values ([1, n_kv, T, d]) to each row's pages."""
        k, v = key[0].transpose(0, 1), value[0].transpose(0, 1)  # [T, n_kv, d]
        for r in self.rows:
            pages = r.pages.setdefault(layer_idx, RowPages())
            end = r.offset + r.count
            self.pool.write(layer_idx, pages, k[r.offset : end], v[r.offset : end])
        self.written.add(layer_idx)
        return key, value

    def attend(
        self, layer: int, query: torch.Tensor, scaling: float | None, softcap: float | None
    ) -> torch.Tensor:
        """[1, H, T, d] queries → [1, T, H, d] outputs, each row over its own pages."""
        window = self.windows[layer]
        outs = []
        for r in self.rows:
            pages = r.pages[layer]
            k, v = self.pool.read(layer, pages)
            k, v = k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0)
            q = query[:, :, r.offset : r.offset + r.count]
            mask = _mask(r.first_pos, r.count, pages.start, pages.length, window, q.device)
            outs.append(_attention(q, k, v, mask, scaling, softcap).transpose(1, 2))
        return torch.cat(outs, dim=1)

    def narrow_positions(self, positions: torch.Tensor) -> PagedKV:
        """The rows whose tokens are at `positions` (whole rows, in order; `rap.core.gates`),
        re-indexed into the narrowed sequence. Writes still go to the same pool."""
        wanted = set(positions.tolist())
        rows, offset = [], 0
        for r in self.rows:
            if r.offset in wanted:
                rows.append(RowStep(r.pages, offset, r.count, r.first_pos))
                offset += r.count
        return PagedKV(self.pool, rows, self.windows, self.written)

    def finish_step(self) -> None:
        """Hand back the pages sliding-window layers no longer attend to."""
        for layer in self.written:
            window = self.windows[layer]
            if window is None:
                continue
            for r in self.rows:
                if layer in r.pages:  # rows that skip the layer hold no pages there
                    pages = r.pages[layer]
                    self.pool.trim_window(layer, pages, pages.length - (window - 1))

    # transformers may ask a cache for these; a paged step answers for the flat sequence.
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    def is_compileable(self) -> bool:  # pragma: no cover - only asked by generate()
        return False


def _mask(
    first_pos: int, count: int, start: int, length: int, window: int | None, device: Any
) -> torch.Tensor | None:
    """Which keys each new token may see (module doc); None when it may see all of them."""
    if count == 1 and (window is None or length - start <= window):
        return None
    q = torch.arange(first_pos, first_pos + count, device=device)[:, None]
    k = torch.arange(start, length, device=device)[None, :]
    allowed = k <= q
    if window is not None:
        allowed &= k > q - window
    return allowed


def _attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float | None,
    softcap: float | None,
) -> torch.Tensor:
    """Grouped-query attention of one row: q [1, H, n, d], k/v [1, n_kv, L, d] → [1, H, n, d]."""
    if softcap is None:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, scale=scaling, enable_gqa=True
        )
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-1, -2)) * (scaling if scaling is not None else q.shape[-1] ** -0.5)
    scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v


def paged_attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature; the keys and values are in `rap_kv`'s pages
    already (the layer called `update` first)."""
    kv: PagedKV = kwargs["rap_kv"]
    return kv.attend(module.layer_idx, query, scaling, softcap), None


AttentionInterface.register(IMPLEMENTATION, paged_attention)


@contextlib.contextmanager
def paged(hf_model: Any) -> Iterator[None]:
    """Run `hf_model` with `rap_paged` attention inside the block (the model's own otherwise:
    generate() and the equivalence references keep theirs)."""
    config = hf_model.config
    before = config._attn_implementation
    config._attn_implementation = IMPLEMENTATION
    try:
        yield
    finally:
        config._attn_implementation = before
