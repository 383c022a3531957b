"""Decode steps replayed from per-layer graphs (rap.serving.decode_graphs), on a CPU: the capture
is `eager_capture` (a replay runs the layer again on the bucket's buffers), so everything but
CUDA's capture itself is checked here — the static buffers, the page tables kept up to date
across steps, rows joining and leaving, eager steps in between, and masks that change. The
CUDA capture is checked by the gpu-marked test at the end and by `bench/gpu/run.sh`."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch

import rap
from rap.serving.decode_graphs import PAGE_SPAN, DecodeGraphs, eager_capture
from rap.serving.kv_pages import PagePool
from rap.serving.scheduler import Request, Scheduler, SchedulerConfig
from tests.serving.test_row_masks import record_logits
from tests.serving.test_scheduler import Collect, run, scheduler

# Rows of different lengths that cross page and page-span boundaries (4-token pages) while
# they decode, one that joins late (prefill steps between graphed ones), max_tokens that
# make rows leave at different steps (B changes: new buckets), and a one-token request whose
# prefill makes the others decode eagerly for three steps, after which the same rows come
# back to the same bucket (its tables must have followed the pages taken meanwhile).
PROMPTS = [list(range(5, 12)), [3, 4], list(range(20, 20 + 2 * PAGE_SPAN + 2))]
MAX_TOKENS = [30, 12, 40]


def _serve(model: Any, graphs: bool) -> tuple[dict[int, list[torch.Tensor]], Collect, Scheduler]:
    sched = scheduler(model, pages=256, max_step_tokens=8)
    if graphs:
        sched.graphs = DecodeGraphs(model, capture=eager_capture)
    seen = record_logits(sched)
    out = Collect()
    for i, (prompt, n) in enumerate(zip(PROMPTS[:2], MAX_TOKENS, strict=False)):
        sched.add(Request(prompt, n, ignore_eos=True), out.sink(i))
    for _ in range(6):
        sched.step()
    sched.add(Request(PROMPTS[2], MAX_TOKENS[2], ignore_eos=True), out.sink(2))
    for _ in range(12):
        sched.step()
    sched.add(Request(list(range(30, 52)), 1, ignore_eos=True), out.sink(3))
    run(sched)
    return seen, out, sched


@pytest.fixture(scope="module")
def model(served_dir: Path) -> Any:
    return rap.load_model(str(served_dir), dtype="float32", device="cpu")


def test_graphed_steps_compute_what_eager_steps_do(model: Any) -> None:
    eager, eager_out, _ = _serve(model, graphs=False)
    graphed, graphed_out, sched = _serve(model, graphs=True)
    assert sched.graphs is not None
    assert sched.graphs.stats.graphed_steps > 30, "most decode steps should replay graphs"
    for i in range(4):
        assert graphed_out.done(i)["token_ids"] == eager_out.done(i)["token_ids"]
    for row, logits in eager.items():
        assert len(graphed[row]) == len(logits)
        for a, b in zip(graphed[row], logits, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert sched.pool.used_pages() == 0, "every page goes back when the rows end"


def test_a_mask_change_recaptures_only_the_layers_it_touches(model: Any) -> None:
    sched = scheduler(model, pages=64, max_step_tokens=16)
    graphs = DecodeGraphs(model, capture=eager_capture)
    sched.graphs = graphs
    out = Collect()
    dense = model.dense_mask()
    try:
        for i in range(2):
            sched.add(Request([5 + i, 6, 7], 12, ignore_eos=True), out.sink(i))
        for _ in range(3):  # a prefill, then two decode steps: each layer captured once
            sched.step()
        assert graphs.stats.captures == model.num_layers
        sched.drop_graphs()  # as the engine does before a mask switch
        model.apply(dense.without(("mlp", 1)))
        before = graphs.stats.captures
        sched.step()
        assert graphs.stats.captures - before == model.num_layers  # a reset: all again
        sched.step()
        sched.step()
        # the bucket's graphs stay valid while nothing moves
        assert graphs.stats.captures - before == model.num_layers
        bucket = next(iter(graphs._buckets.values()))
        kept = bucket.graphs[0]
        model.apply(dense.without(("mlp", 1), ("mlp", 0)))  # no reset: keys catch it
        sched.step()
        assert graphs.stats.captures - before == model.num_layers + 1, "only layer 0 again"
        assert bucket.graphs[0] is not kept and bucket.graphs[1] is not None
        run(sched)
        assert all(out.done(i)["type"] == "done" for i in range(2))
    finally:
        model.apply(dense)


def test_dropping_the_graphs_lets_the_pool_go_without_the_garbage_collector(model: Any) -> None:
    """The engine replaces its pool after `drop_graphs()`; nothing of the graphs may keep the
    old one (its slabs are the KV bytes the budget just took back)."""
    sched = scheduler(model, pages=64)
    sched.graphs = DecodeGraphs(model, capture=eager_capture)
    out = Collect()
    for i in range(2):
        sched.add(Request([5 + i, 6, 7], 4, ignore_eos=True), out.sink(i))
    run(sched)
    assert sched.graphs.stats.graphed_steps > 0
    old = weakref.ref(sched.pool)
    gc.disable()
    try:
        sched.drop_graphs()
        sched.pool = scheduler(model, pages=8).pool
        assert old() is None, "a reference cycle keeps the old pool alive"
    finally:
        gc.enable()


def test_a_model_that_keeps_no_attention_layer_decodes_from_graphs_too(model: Any) -> None:
    dense = model.dense_mask()
    model.apply(dense.without(*[("attn", i) for i in range(model.num_layers)]))
    try:
        tokens = []
        for graphs in (False, True):
            sched = scheduler(model)  # the pool of the mask: no slab at all
            assert sched.pool.layers == []
            if graphs:
                sched.graphs = DecodeGraphs(model, capture=eager_capture)
            out = Collect()
            for i in range(2):
                sched.add(Request([5 + i, 6, 7], 6, ignore_eos=True), out.sink(i))
            run(sched)
            tokens.append([out.done(i)["token_ids"] for i in range(2)])
        assert sched.graphs is not None and sched.graphs.stats.graphed_steps > 0
        assert tokens[0] == tokens[1]
    finally:
        model.apply(dense)


def test_steps_that_graphs_cannot_run_stay_eager(model: Any, served: dict[str, Path]) -> None:
    graphs = DecodeGraphs(model, capture=eager_capture)
    from rap.serving.paged_attention import RowStep

    decode, prefill = RowStep({}, 0, 1, 5), RowStep({}, 1, 4, 0)
    assert graphs.fits([decode, decode], gated=False)
    assert not graphs.fits([decode, prefill], gated=False), "a prefill chunk in the step"
    assert not graphs.fits([decode, decode], gated=True), "rows running different blocks"
    assert not graphs.fits([], gated=False)
    gemma = rap.load_model(str(served["gemma2"]), dtype="float32", device="cpu")
    assert not DecodeGraphs(gemma, capture=eager_capture).supported, "windows and soft-capping"


def test_the_scheduler_uses_graphs_only_on_a_gpu(model: Any) -> None:
    sched: Scheduler = scheduler(model)
    assert sched.graphs is None  # a CPU model: cuda_graphs is ignored


@pytest.mark.gpu
def test_cuda_graphs_compute_what_eager_steps_do(served_dir: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA")
    gpu = rap.load_model(str(served_dir), dtype="float32", device="cuda")
    results = []
    for graphs in (False, True):
        config = SchedulerConfig(page_tokens=4, max_step_tokens=8, cuda_graphs=graphs)
        d = gpu.dims
        layers = list(range(gpu.num_layers))
        pool = PagePool(layers, 256, 4, d.kv_heads, d.head_dim, gpu.dtype, gpu.device)
        sched = Scheduler(gpu, pool, config)
        assert (sched.graphs is not None) == graphs
        seen = record_logits(sched)
        out = Collect()
        for i, prompt in enumerate(PROMPTS):
            sched.add(Request(prompt, 20, ignore_eos=True), out.sink(i))
        run(sched)
        results.append((seen, [out.done(i)["token_ids"] for i in range(3)], sched))
    (eager, eager_ids, _), (graphed, graphed_ids, sched) = results
    assert sched.graphs is not None and sched.graphs.stats.graphed_steps > 10
    assert graphed_ids == eager_ids
    for row, logits in eager.items():
        for a, b in zip(graphed[row], logits, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
