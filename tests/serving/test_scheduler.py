"""Per-step scheduling over KV pages (rap.serving.scheduler), on tiny models of every
architecture: exactly what generate() computes, one forward per step, pages that follow rows."""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import rap
from rap.core import memory
from rap.core.masks import KeepMask
from rap.serving.kv_pages import PagePool
from rap.serving.scheduler import Request, Scheduler, SchedulerConfig
from tests.tiny import ARCHS, SLIDING

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [9, 8, 7, 6, 5, 4, 3, 20, 21, 12, 13, 14, 15]]


class Collect:
    """A sink per request that keeps its events."""

    def __init__(self) -> None:
        self.events: dict[int, list[dict[str, Any]]] = {}

    def sink(self, key: int) -> Any:
        self.events[key] = []
        return self.events[key].append

    def done(self, key: int) -> dict[str, Any]:
        last = self.events[key][-1]
        assert last["type"] in ("done", "error"), self.events[key]
        return last

    def text(self, key: int) -> str:
        return "".join(e["text"] for e in self.events[key] if e["type"] == "token")


def scheduler(model: Any, pages: int = 64, **kw: Any) -> Scheduler:
    config = SchedulerConfig(**{"page_tokens": 4, "max_step_tokens": 5, **kw})
    kept = [i for i, k in enumerate(model.mask.attn) if k]
    d = model.dims
    pool = PagePool(kept, pages, config.page_tokens, d.kv_heads, d.head_dim, model.dtype)
    return Scheduler(model, pool, config)


def _until_eos(model: Any, ids: list[int]) -> list[int]:
    """generate()'s row up to its end-of-sequence token (the scheduler does not return it)."""
    eos = model.eos_ids()
    return ids[: next((i for i, t in enumerate(ids) if t in eos), len(ids))]


def run(sched: Scheduler, limit: int = 200) -> int:
    steps = 0
    while not sched.idle and steps < limit:
        sched.step()
        steps += 1
    assert sched.idle, "the scheduler did not finish"
    return steps


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("drop_attn0", [False, True])
def test_rows_of_different_lengths_get_what_generate_gives(
    arch: str, drop_attn0: bool, served: dict[str, Path]
) -> None:
    """Chunked prefill, decodes and a late arrival share steps; each row's tokens equal greedy
    generate() of that prompt alone (sliding windows and a dropped first layer included)."""
    model = rap.load_model(str(served[arch]), device="cpu")
    if drop_attn0:
        model.apply(KeepMask.from_drops(model.model_id, model.num_layers, drop_attn="0"))
    want = [
        _until_eos(model, model.generate_ids([p], 8).token_ids[0]) for p in [*PROMPTS, [30, 31, 32]]
    ]
    sched, got = scheduler(model), Collect()
    for i, p in enumerate(PROMPTS):
        sched.add(Request(list(p), 8), got.sink(i))
    for _ in range(3):
        sched.step()
    sched.add(Request([30, 31, 32], 8), got.sink(3))  # arrives while the others decode
    run(sched)
    for i, ids in enumerate(want):
        assert got.done(i)["token_ids"] == ids, (arch, i)
    assert sched.stats.forwards == sched.stats.steps
    assert sched.pool.used_pages() == 0  # every row's pages came back


def test_one_forward_per_step_and_decodes_never_wait_for_a_long_prompt(served) -> None:
    model = rap.load_model(str(served["llama"]), device="cpu")
    sched, got = scheduler(model, max_step_tokens=4), Collect()
    sched.add(Request([5, 6], 12), got.sink(0))
    sched.step()  # row 0 prefilled and has its first token
    calls = 0
    forward = model.hf.forward

    def counted(*a: Any, **kw: Any) -> Any:
        nonlocal calls
        calls += 1
        return forward(*a, **kw)

    model.hf.forward = counted
    sched.add(Request(list(range(4, 44)), 4), got.sink(1))  # 40 prompt tokens, 4 per step
    tokens_before = [len(got.events[0])]
    for _ in range(10):
        sched.step()
        tokens_before.append(len(got.events[0]))
    assert calls == 10  # one batched forward per step, whatever the rows
    # Row 0 got a token in every step while row 1's prompt was fed in chunks of 3 (4 − 1).
    assert all(b - a == 1 for a, b in itertools.pairwise(tokens_before))


def test_pool_bytes_are_the_memory_models_and_dropped_layers_hold_none(served) -> None:
    model = rap.load_model(str(served["mistral"]), device="cpu")
    mask = KeepMask.from_drops(model.model_id, model.num_layers, drop_attn="1,3")
    model.apply(mask)
    sched = scheduler(model, pages=10)
    pool = sched.pool
    assert pool.layers == [0, 2]
    predicted = memory.kv_pool_bytes(model.config, mask, model.dtype, 4, 10)
    assert pool.nbytes == predicted
    got = Collect()
    sched.add(Request(list(range(4, 24)), 6), got.sink(0))  # 26 tokens, window 5
    seen = 0
    while not sched.idle:
        sched.step()
        row_pages = [r.pages for r in sched.running]
        for pages in row_pages:
            assert set(pages) <= {0, 2}  # no page in a dropped attention layer
            seen = max(seen, max(len(p.pages) for p in pages.values()))
    # A window of 5 keeps at most ⌈(5 − 1 + chunk 5) / 4⌉ + 1 pages per layer, not ⌈26 / 4⌉.
    assert seen <= memory.kv_row_pages(5, 26, 4, 5) < 7
    assert pool.used_pages() == 0


def test_cancel_frees_pages_in_that_step_and_others_go_on(served) -> None:
    model = rap.load_model(str(served["llama"]), device="cpu")
    sched, got = scheduler(model), Collect()
    a = sched.add(Request([5, 6, 7], 30), got.sink(0))
    sched.add(Request([8, 9], 5), got.sink(1))
    for _ in range(4):
        sched.step()
    held = sched.pool.used_pages()
    sched.cancel(a)
    sched.step()
    assert got.done(0)["finish_reason"] == "cancelled"
    assert sched.pool.used_pages() < held and len(sched.running) <= 1
    run(sched)
    assert got.done(1)["finish_reason"] in ("length", "stop")


def test_a_failed_step_fails_its_rows_and_the_scheduler_goes_on(served) -> None:
    model = rap.load_model(str(served["llama"]), device="cpu")
    sched, got = scheduler(model), Collect()
    forward = model.hf.forward

    def boom(*a: Any, **kw: Any) -> Any:
        model.hf.forward = forward  # fails once
        raise RuntimeError("injected")

    model.hf.forward = boom
    sched.add(Request([5, 6], 4), got.sink(0))
    sched.step()
    assert got.done(0)["status"] == 500 and "injected" in got.done(0)["message"]
    assert sched.pool.used_pages() == 0
    sched.add(Request([5, 6], 4), got.sink(1))
    run(sched)
    assert got.done(1)["type"] == "done"


def test_requests_beyond_the_pool_or_the_wait_get_503(served) -> None:
    model = rap.load_model(str(served["llama"]), device="cpu")
    sched, got = scheduler(model, pages=4, max_wait_s=0.01), Collect()  # 4 pages of 4 tokens
    sched.add(Request(list(range(4, 20)), 8), got.sink(0))  # 24 tokens: 6 pages, never fits
    sched.add(Request([5, 6], 10), got.sink(1))  # 12 tokens: 3 pages
    sched.add(Request([7, 8], 10), got.sink(2))  # waits for row 1's pages
    sched.step()
    assert got.done(0)["status"] == 503 and "needs 6 KV pages" in got.done(0)["message"]
    assert got.events[1][0]["type"] == "start" and got.events[2] == []
    time.sleep(0.02)
    sched.step()
    assert got.done(2)["status"] == 503 and got.done(2)["retry_after"] == 2


def test_rows_with_different_sampling_share_steps_and_seeds_repeat(served) -> None:
    model = rap.load_model(str(served["llama"]), device="cpu")
    outs = []
    for _ in range(2):
        sched, got = scheduler(model), Collect()
        sched.add(Request([5, 6, 7], 6), got.sink(0))
        sched.add(Request([5, 6, 7], 6, temperature=1.5, top_p=0.9, seed=3), got.sink(1))
        steps = run(sched)
        assert sched.stats.forwards == steps <= 8  # shared, not one batch per setting
        outs.append((got.done(0)["token_ids"], got.done(1)["token_ids"]))
    assert outs[0] == outs[1]
    torch.manual_seed(0)
    assert outs[0][0] == _until_eos(model, model.generate_ids([[5, 6, 7]], 6).token_ids[0])


def test_sliding_archs_are_the_ones_tested_with_windows() -> None:
    assert set(SLIDING) <= set(ARCHS)


def test_greedy_rows_pick_together_what_each_picks_alone() -> None:
    """`greedy_many` (one argmax for the step's greedy rows) equals per-row `sample` at
    temperature 0, ties included (the first maximum)."""
    from rap.serving.sampling import greedy_many, sample

    g = torch.Generator().manual_seed(0)
    rows = [torch.randn(50, generator=g) for _ in range(7)]
    rows.append(torch.zeros(50))  # all tied: index 0
    assert greedy_many(rows) == [sample(r, 0.0, 1.0, None) for r in rows]
    assert greedy_many([]) == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_row_seeded_on_the_cpu_samples_from_gpu_logits() -> None:
    from rap.serving.sampling import sample

    logits = torch.randn(1000, device="cuda")
    a = sample(logits, 0.8, 0.9, torch.Generator().manual_seed(3))
    b = sample(logits, 0.8, 0.9, torch.Generator().manual_seed(3))
    assert a == b and 0 <= a < 1000
