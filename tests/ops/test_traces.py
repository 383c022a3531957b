"""Benchmark traces (`rap.ops.traces`): fixed, hashed, drawn from the published lengths."""

from __future__ import annotations

import statistics

import pytest

from rap.core.errors import RapError
from rap.ops import traces


def test_the_published_lengths_are_the_splitwise_conversation_trace() -> None:
    pairs = traces.read_lengths()
    assert len(pairs) == 19_366
    # Splitwise (ISCA 2024) reports medians of 1,020 prompt and 129 output tokens for it.
    assert statistics.median(p for p, _ in pairs) == 1020
    assert statistics.median(o for _, o in pairs) == 129


def test_the_committed_shock_trace_is_what_its_maker_makes() -> None:
    """A change to the maker that would change the trace shows here, not in results."""
    committed = traces.load_trace("shock")
    assert traces.make_shock() == committed
    assert committed.sha256 == committed.digest()


def test_shock_has_two_depths_that_come_back_and_service_levels() -> None:
    trace = traces.load_trace("shock")
    fractions = [s.fraction for s in trace.budget]
    assert fractions[0] == 1.0 and fractions[-1] == 1.0
    assert {0.7, 0.4} <= set(fractions)  # a co-tenant takes 30 % and 60 %
    assert all(a.t < b.t for a, b in zip(trace.budget, trace.budget[1:], strict=False))
    assert trace.slo.ttft_s > 0 and trace.slo.tpot_s > 0
    times = [r.t for r in trace.requests]
    assert times == sorted(times) and len(times) == 240
    assert all(8 <= r.prompt_tokens <= 512 and 8 <= r.max_tokens <= 96 for r in trace.requests)


def test_an_edited_trace_is_refused(tmp_path) -> None:
    trace = traces.load_trace("shock")
    edited = trace.model_copy(update={"length_scale": 0.25})
    path = tmp_path / "shock.json"
    path.write_text(edited.model_dump_json())
    with pytest.raises(RapError, match="sha256"):
        traces.load_trace(str(path))
    with pytest.raises(RapError, match="no trace"):
        traces.load_trace("nonesuch")
