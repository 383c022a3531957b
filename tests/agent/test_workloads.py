"""Workloads: seeded determinism, the scenario registry, lengths, batches and memory traces."""

from __future__ import annotations

import numpy as np
import pytest

from rap.agent import scenarios, workloads
from rap.core.errors import RapError
from tests.tiny import tiny_config


@pytest.fixture(scope="module")
def cfg():
    return tiny_config("llama")


def test_same_seed_same_situations(cfg) -> None:
    a = workloads.situations("chat-steps", cfg, "float16", seed=3, count=50)
    b = workloads.situations("chat-steps", cfg, "float16", seed=3, count=50)
    c = workloads.situations("chat-steps", cfg, "float16", seed=4, count=50)
    assert a == b
    assert a != c
    assert len(a) == 50


def test_registry_splits_are_disjoint_and_named() -> None:
    splits = [set(scenarios.names(s)) for s in ("train", "validation", "test")]
    assert all(splits)
    assert sum(len(s) for s in splits) == len(set().union(*splits))  # disjoint
    assert set().union(*splits) == set(scenarios.names())
    with pytest.raises(RapError, match="unknown scenario"):
        scenarios.get("no-such-scenario")
    with pytest.raises(RapError, match="already registered"):
        scenarios.register(scenarios.get("chat-steady"))


def test_chat_lengths_are_heavy_tailed_and_clipped() -> None:
    rng = np.random.default_rng(0)
    d = scenarios.CHAT_PROMPT
    xs = np.array([d.sample(rng) for _ in range(4000)])
    assert xs.min() >= d.lo and xs.max() <= d.hi
    # log-normal with σ = 1: the 99th percentile is ~10× the median
    assert np.percentile(xs, 99) > 5 * np.median(xs)


def test_batches_respect_max_batch_and_fcfs() -> None:
    sc = scenarios.get("mixed-burst")
    starts = []
    for t, reqs in workloads.batches(sc, seed=1):
        assert 1 <= len(reqs) <= sc.max_batch
        assert all(r.arrival_s <= t for r in reqs)
        starts.append(t)
        if len(starts) == 200:
            break
    assert starts == sorted(starts)


def test_weights_and_kv_dominated_scenarios_differ(cfg) -> None:
    b1 = workloads.situations("eval-b1-steps", cfg, "float16", 10_000, 100)
    kv = workloads.situations("eval-kv-2048", cfg, "float16", 10_000, 100)
    assert all(s.batch == 1 and s.seq <= 330 for s in b1)
    assert np.median([s.batch for s in kv]) >= 8
    assert np.median([s.seq for s in kv]) >= 1500


def test_admission_splits_batches_far_over_budget(cfg) -> None:
    for s in workloads.situations("long-kv-spikes", cfg, "float16", 0, 200):
        dense = workloads.dense_bytes(cfg, s.batch, s.seq, s.prefill, "float16")
        assert s.batch == 1 or dense <= workloads.MAX_OVER * s.budget_bytes


@pytest.mark.parametrize("kind", ["steady", "steps", "ramp", "spikes"])
def test_memory_traces_stay_in_their_range(kind: scenarios.MemoryKind) -> None:
    trace = scenarios.MemoryTrace(kind, level=0.95, low=0.7, period_s=10.0, levels=(0.9, 0.8))
    t = np.arange(0.0, 200.0, 0.5)
    m = trace.fractions(t, np.random.default_rng(0))
    lo, hi = (0.8, 0.9) if kind == "steps" else (0.7, 0.95)
    assert m.min() >= lo - 1e-9 and m.max() <= hi + 1e-9
    if kind != "steady":
        assert m.max() - m.min() > 0.05  # it moves


def test_steps_cycle_through_levels() -> None:
    trace = scenarios.MemoryTrace("steps", levels=(0.9, 0.8, 0.7), period_s=10.0)
    m = trace.fractions(np.array([0.0, 10.0, 20.0, 30.0]), np.random.default_rng(0))
    assert list(m) == pytest.approx([0.9, 0.8, 0.7, 0.9])


def test_grid_scenarios_cover_the_controller_buckets(cfg) -> None:
    sits = workloads.situations("eval-controller-grid", cfg, "float16", 10_000, 200)
    assert {(s.batch, s.seq) for s in sits} == {
        (b, q) for b in (1, 4, 8) for q in (256, 1024, 2048)
    }
    for s in sits:  # the one byte accounting: weights + KV + the engine's step
        dense = workloads.dense_bytes(cfg, s.batch, s.seq, s.seq, "float16")
        assert 0.75 * dense - 1 <= s.budget_bytes <= 0.97 * dense
