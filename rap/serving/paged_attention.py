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
and a layer whose attention block is dropped is never called, so it holds no pages.
transformers builds no mask for an attention implementation it has no mask function for, so
nothing else of the model changes.

Rows that bring one token each (decoding; at least two of them) go together, so that a step
costs a few kernels per layer rather than a few per row and layer: one indexed store appends
their keys and values (`PagePool.write_tokens`), one gather pads their pages to the longest
row's M pages (`PagePool.read_rows`: key index j of row b holds position start_b + j), and one
attention call covers them all with a per-row key range instead of the mask above:

    out_b = softmax(q_b · K_bᵀ · scale + mask_b) · V_b,   K_b, V_b : [M · page_tokens, n_kv, d]
    mask_b[j] = 0 if lo_b ≤ j < hi_b, else −∞   (`_key_range`: the keys mask_r allows; the
                                                  padding past a row's own tokens never)

The query heads are grouped by the KV head they read, q [B, n_kv, H / n_kv, d], so the call
needs no head repetition. Rows prefilling a chunk keep the row-by-row path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from rap.serving.kv_pages import PagePool, RowPages, device_longs

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
    decoding: list[int] = field(init=False)
    """Indices of the rows that go through the batched path (module doc); empty when fewer
    than two rows bring one token, where batching saves nothing."""

    def __post_init__(self) -> None:
        one = [i for i, r in enumerate(self.rows) if r.count == 1]
        self.decoding = one if len(one) >= 2 else []

    def update(
        self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args: Any, **kw: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the step's keys and values ([1, n_kv, T, d]) to each row's pages (the
        decoding rows in one store)."""
        k, v = key[0].transpose(0, 1), value[0].transpose(0, 1)  # [T, n_kv, d]
        if self.decoding:
            rows = [self.rows[i] for i in self.decoding]
            held = [r.pages.setdefault(layer_idx, RowPages()) for r in rows]
            offsets = [r.offset for r in rows]
            self.pool.write_tokens(layer_idx, held, _take(k, offsets, 0), _take(v, offsets, 0))
        batched = set(self.decoding)
        for i, r in enumerate(self.rows):
            if i in batched:
                continue
            pages = r.pages.setdefault(layer_idx, RowPages())
            end = r.offset + r.count
            self.pool.write(layer_idx, pages, k[r.offset : end], v[r.offset : end])
        self.written.add(layer_idx)
        return key, value

    def attend(
        self, layer: int, query: torch.Tensor, scaling: float | None, softcap: float | None
    ) -> torch.Tensor:
        """[1, H, T, d] queries → [1, T, H, d] outputs, each row over its own pages (the
        decoding rows in one call, `_attend_decoding`)."""
        window = self.windows[layer]
        together = None
        if self.decoding:
            together = self._attend_decoding(layer, query, scaling, softcap)  # [B, H, d]
            if len(self.decoding) == len(self.rows):
                return together.unsqueeze(0)
        where = {i: b for b, i in enumerate(self.decoding)}
        outs = []
        for i, r in enumerate(self.rows):
            if together is not None and i in where:
                outs.append(together[where[i]][None, None])  # [1, 1, H, d]
                continue
            pages = r.pages[layer]
            k, v = self.pool.read(layer, pages)
            k, v = k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0)
            q = query[:, :, r.offset : r.offset + r.count]
            mask = _mask(r.first_pos, r.count, pages.start, pages.length, window, q.device)
            outs.append(grouped_attention(q, k, v, mask, scaling, softcap).transpose(1, 2))
        return torch.cat(outs, dim=1)

    def _attend_decoding(
        self, layer: int, query: torch.Tensor, scaling: float | None, softcap: float | None
    ) -> torch.Tensor:
        """The decoding rows' outputs [B, H, d] from one gather and one attention call over
        their padded pages (module doc)."""
        rows = [self.rows[i] for i in self.decoding]
        held = [r.pages[layer] for r in rows]
        k, v, span = self.pool.read_rows(layer, held)  # [B, L, n_kv, d]
        window = self.windows[layer]
        ranges = [
            _key_range(r.first_pos, p.start, p.length, window)
            for r, p in zip(rows, held, strict=True)
        ]
        bounds = device_longs([lo for lo, _ in ranges] + [hi for _, hi in ranges], query.device)
        lo, hi = bounds.view(2, len(rows), 1)
        j = torch.arange(span, device=query.device)
        mask = ((j >= lo) & (j < hi))[:, None, None, :]  # [B, 1, 1, L]: over heads and queries
        batch, kv_heads, d = len(rows), k.shape[2], query.shape[-1]
        q = _take(query[0], [r.offset for r in rows], 1).transpose(0, 1)  # [B, H, d]
        # Query head h reads KV head h // (H / n_kv) (GQA's repeat_interleave): grouping the
        # heads that share a KV head as that head's queries gives the same scores, unrepeated.
        q = q.reshape(batch, kv_heads, -1, d)
        out = grouped_attention(q, k.transpose(1, 2), v.transpose(1, 2), mask, scaling, softcap)
        return out.reshape(batch, -1, d)

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


def _key_range(first_pos: int, start: int, length: int, window: int | None) -> tuple[int, int]:
    """Key indices [lo, hi) that a row's one new token (at `first_pos`) may see among the keys
    it holds (index j: position start + j): `_mask`'s rule as a range, all of them where
    `_mask` gives None, else start + j ≤ first_pos and first_pos − (start + j) < W."""
    held = length - start
    if window is None or held <= window:
        return 0, held
    return max(0, first_pos - window + 1 - start), min(held, first_pos + 1 - start)


def _take(t: torch.Tensor, offsets: list[int], dim: int) -> torch.Tensor:
    """`t` at `offsets` along `dim`: a view where they run consecutively (decoding rows come
    first in a step, `rap.serving.batching.compose`), one gather otherwise."""
    first, n = offsets[0], len(offsets)
    if offsets == list(range(first, first + n)):
        return t.narrow(dim, first, n)
    return t.index_select(dim, device_longs(offsets, t.device))


def grouped_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float | None,
    softcap: float | None,
) -> torch.Tensor:
    """Grouped-query attention: q [B, H, n, d], k/v [B, n_kv, L, d] → [B, H, n, d] (B = 1: one
    row; the mask [n, L] or [B, 1, n, L] True where a key may be seen)."""
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
