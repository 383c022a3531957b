"""Decoding rows attend together (rap.serving.paged_attention): one store, one gather and one
attention call per layer give what each row gives alone (the row-by-row path), over rows of
different lengths, page counts and window starts, in mixed steps and narrowed (gated) steps."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from rap.serving import paged_attention
from rap.serving.kv_pages import PagePool, RowPages
from rap.serving.paged_attention import PagedKV, RowStep

PAGE, KV_HEADS, HEADS, DIM, WINDOW = 4, 2, 4, 8, 6
WINDOWS = (None, WINDOW)  # layer 0 full attention, layer 1 a sliding window
HELD = [0, 3, 4, 9, 20, 22]  # tokens each row holds before the step: 0 to 6 pages


def _setup(held: list[int]) -> tuple[PagePool, list[dict[int, RowPages]]]:
    """A pool whose rows hold `held` random tokens in both layers, the windowed layer trimmed
    as `PagedKV.finish_step` does (so rows start at different positions)."""
    gen = torch.Generator().manual_seed(0)
    pool = PagePool([0, 1], 64, PAGE, KV_HEADS, DIM, torch.float32)
    rows: list[dict[int, RowPages]] = []
    for n in held:
        pages = {0: RowPages(), 1: RowPages()}
        for layer in (0, 1):
            k, v = (torch.randn(n, KV_HEADS, DIM, generator=gen) for _ in range(2))
            pool.write(layer, pages[layer], k, v)
        pool.trim_window(1, pages[1], n - (WINDOW - 1))
        rows.append(pages)
    return pool, rows


def _step(
    kv: PagedKV, keys: list[torch.Tensor], query: torch.Tensor, softcap: float | None
) -> list[torch.Tensor]:
    """One forward's attention over both layers: each layer's outputs [1, T, H, d]."""
    outs = []
    for layer in (0, 1):
        k, v = keys[layer].chunk(2, dim=0)
        kv.update(k, v, layer)
        outs.append(kv.attend(layer, query, 0.3, softcap))
    return outs


def _inputs(tokens: int, seed: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per layer, new keys and values stacked [2, n_kv, T, d]; queries [1, H, T, d]."""
    gen = torch.Generator().manual_seed(seed)
    keys = [torch.randn(2, KV_HEADS, tokens, DIM, generator=gen) for _ in (0, 1)]
    return keys, torch.randn(1, HEADS, tokens, DIM, generator=gen)


def _alone(
    counts: list[int], softcap: float | None, only: list[int] | None = None
) -> list[torch.Tensor]:
    """The reference: every row (of `only`, all by default) in a step of its own (one row
    never takes the batched path)."""
    pool, rows = _setup(HELD)
    which = only if only is not None else list(range(len(HELD)))
    keys, query = _inputs(sum(counts), seed=1)
    outs: list[list[torch.Tensor]] = [[], []]
    offset = 0
    for i, count in zip(which, counts, strict=True):
        pages, n = rows[i], HELD[i]
        kv = PagedKV(pool, [RowStep(pages, 0, count, n)], WINDOWS)
        assert not kv.decoding
        part = slice(offset, offset + count)
        for layer, out in enumerate(
            _step(kv, [k[:, :, part] for k in keys], query[:, :, part], softcap)
        ):
            outs[layer].append(out)
        offset += count
    return [torch.cat(o, dim=1) for o in outs]


def _together(
    held: list[int], counts: list[int], softcap: float | None, monkeypatch: pytest.MonkeyPatch
) -> tuple[list[torch.Tensor], list[int], PagePool, list[dict[int, RowPages]]]:
    """All rows in one step; also how many attention calls each row-set made."""
    pool, rows = _setup(held)
    keys, query = _inputs(sum(counts), seed=1)
    calls: list[int] = []
    original = paged_attention.grouped_attention

    def counted(q: torch.Tensor, *args: Any) -> torch.Tensor:
        calls.append(q.shape[0])  # rows in the call
        return original(q, *args)

    monkeypatch.setattr(paged_attention, "grouped_attention", counted)
    offsets = [sum(counts[:i]) for i in range(len(counts))]
    steps = [RowStep(p, o, c, n) for p, o, c, n in zip(rows, offsets, counts, held, strict=True)]
    return _step(PagedKV(pool, steps, WINDOWS), keys, query, softcap), calls, pool, rows


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_a_decode_step_attends_once_per_layer_as_each_row_alone(
    softcap: float | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    counts = [1] * len(HELD)
    got, calls, pool, rows = _together(HELD, counts, softcap, monkeypatch)
    assert calls == [len(HELD), len(HELD)]  # one call per layer, every row in it
    for g, want in zip(got, _alone(counts, softcap), strict=True):
        assert g.shape == (1, len(HELD), HEADS, DIM)
        torch.testing.assert_close(g, want, atol=1e-5, rtol=0)
    ref_pool, ref_rows = _setup(HELD)
    _alone_writes(ref_pool, ref_rows, counts)
    for layer in (0, 1):
        for mine, ref in zip(rows, ref_rows, strict=True):
            assert (mine[layer].pages, mine[layer].start, mine[layer].length) == (
                ref[layer].pages,
                ref[layer].start,
                ref[layer].length,
            )
            k, v = pool.read(layer, mine[layer])
            rk, rv = ref_pool.read(layer, ref[layer])
            assert torch.equal(k, rk) and torch.equal(v, rv)


def _alone_writes(pool: PagePool, rows: list[dict[int, RowPages]], counts: list[int]) -> None:
    """The reference's writes: each row's new keys through `PagePool.write`."""
    keys, _ = _inputs(sum(counts), seed=1)
    offset = 0
    for pages, count in zip(rows, counts, strict=True):
        for layer in (0, 1):
            k, v = keys[layer][:, :, offset : offset + count].transpose(1, 2).unbind(0)
            pool.write(layer, pages[layer], k, v)
        offset += count


def test_a_mixed_step_batches_its_decoding_rows_only(monkeypatch: pytest.MonkeyPatch) -> None:
    counts = [1, 1, 3, 1, 2, 1]  # two rows prefill a chunk
    got, calls, _, _ = _together(HELD, counts, None, monkeypatch)
    assert calls == [4, 1, 1] * 2  # the four decoding rows together, the others alone
    for g, want in zip(got, _alone(counts, None), strict=True):
        torch.testing.assert_close(g, want, atol=1e-5, rtol=0)


def test_a_narrowed_step_batches_the_rows_it_keeps(monkeypatch: pytest.MonkeyPatch) -> None:
    """`rap.core.gates` narrows the step to the rows that keep a block: the rows at flat
    positions 1, 3, 4 here, re-indexed 0, 1, 2, still batched."""
    pool, rows = _setup(HELD)
    kv = PagedKV(
        pool,
        [RowStep(p, i, 1, n) for i, (p, n) in enumerate(zip(rows, HELD, strict=True))],
        WINDOWS,
    )
    narrow = kv.narrow_positions(torch.tensor([1, 3, 4]))
    assert narrow.decoding == [0, 1, 2]
    keys, query = _inputs(3, seed=1)
    calls: list[int] = []
    original = paged_attention.grouped_attention
    monkeypatch.setattr(
        paged_attention,
        "grouped_attention",
        lambda q, *a: calls.append(q.shape[0]) or original(q, *a),
    )
    got = _step(narrow, keys, query, None)
    assert calls == [3, 3]
    for g, want in zip(got, _alone([1, 1, 1], None, only=[1, 3, 4]), strict=True):
        torch.testing.assert_close(g, want, atol=1e-5, rtol=0)


def test_the_batched_read_pads_with_held_pages_and_reports_the_span() -> None:
    pool, rows = _setup([3, 9, 0])
    pool.write(0, rows[2][0], torch.ones(1, KV_HEADS, DIM), torch.ones(1, KV_HEADS, DIM))
    k, v, span = pool.read_rows(0, [r[0] for r in rows])
    assert span == 3 * PAGE and k.shape == v.shape == (3, span, KV_HEADS, DIM)
    for b, r in enumerate(rows):
        held, _ = pool.read(0, r[0])
        assert torch.equal(k[b, : held.shape[0]], held)
