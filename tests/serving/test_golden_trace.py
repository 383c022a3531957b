"""A fresh run of the engine's golden trace (tests/serving/golden_trace.py) is the committed one,
step for step, and the committed one reaches what it is there to pin."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.serving.engine_driver import CONFIG
from tests.serving.golden_trace import GOLDEN, first_difference, load, trace

REWRITE = (
    "if the engine's behaviour was meant to change: .venv/bin/python -m "
    "tests.serving.golden_trace --write, and say in the commit why the trace changed"
)


@pytest.fixture(scope="module")
def golden() -> list[dict[str, Any]]:
    return load()


def test_a_fresh_run_is_the_golden_trace(served: dict[str, Path], golden) -> None:
    """The same tiny llama (tests/tiny.py, seed 0) the trace was written with."""
    diff = first_difference(golden, trace(served["llama"]))
    assert diff is None, f"the engine's trace left {GOLDEN.name} at {diff}; {REWRITE}"


def _pages(rows: list[dict[str, Any]]) -> list[int]:
    return [p for r in rows for pages in r["pages"].values() for p in pages]


def _turn(golden: list[dict[str, Any]], control: str) -> int:
    return next(line["turn"] for line in golden if any(control in c for c in line["controls"]))


def test_the_golden_trace_reaches_what_it_pins(golden) -> None:
    """So that a rewritten trace cannot quietly stop covering a path: the budget drop shrinks
    the mask, preempts the youngest rows and moves a survivor's page below the new capacity;
    the ceiling shrinks it again; the release grows it while older rows keep skipping the
    restored blocks; a stop string, a cancellation, a slow reader sitting out steps with its
    pages, a request for the dense model overtaken while the model is pruned; sampled rows;
    and no step beyond `max_step_tokens`."""
    drop = _turn(golden, "set_budget")
    before, cut = golden[drop - 1], golden[drop]
    assert cut["mask"] == "a1,m0" and cut["pool_pages"] < before["pool_pages"]
    ages = [r["id"] for r in before["running"]]
    assert cut["preempted"] == ages[-len(cut["preempted"]) :] != []  # the youngest
    survivors = [r for r in before["running"] if r["id"] not in cut["preempted"]]
    assert max(_pages(survivors)) >= cut["pool_pages"], "the cut moved no page: no compaction"
    assert max(_pages(cut["running"])) < cut["pool_pages"]
    capped = golden[_turn(golden, "set_ceiling 'm2'")]
    assert capped["mask"] == "a1,m0,m2"
    grown = golden[_turn(golden, "set_ceiling None")]
    assert grown["mask"] == "" and {r["mask"] for r in grown["running"]} == {"a1,m0,m2", ""}
    ends = {k: v for line in golden for k, v in line["ended"].items()}
    reasons = sorted(e.get("finish_reason") for e in ends.values())
    assert reasons == ["cancelled", "length", "length", "length", "length", "stop"], reasons
    dense_only = next(i for i, e in ends.items() if e["fingerprint"].endswith("keep1.000"))
    waited = [line["turn"] for line in golden if int(dense_only) in line["waiting"]]
    assert waited and any(len(golden[t]["running"]) > len(cut["running"]) for t in waited)
    sat_out = [
        line["turn"]
        for line in golden
        if line["running"] and line["forward_tokens"] == 0  # rows run, none could step
    ]
    assert sat_out, "the slow reader never held its row back"
    assert all(line["forward_tokens"] <= CONFIG.max_step_tokens for line in golden)
    sampled = [c for c in golden[0]["controls"] if "temperature" in c]
    assert len(sampled) == 2
