"""bench/mask_rules.py's replay of the engine's mask rule on a load trace (run by hand for the
figures; here on two simulated minutes, mask level, no forward pass)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("mask_rules", ROOT / "bench" / "mask_rules.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["mask_rules"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_every_rule_serves_every_row_and_only_the_engine_rule_never_preempts(bench) -> None:
    from rap.core.loading import load_config

    config, model_id = load_config("smollm2")
    full = bench.dense_bytes(config, bench.MAX_ROWS, 1024)
    arrivals, shares = bench.trace(2.0, seed=0)
    plan = bench.Planned(bench.planners(config, model_id)["rap"], config)
    tallies = {rule: bench.simulate(rule, plan, arrivals, shares, full) for rule in bench.RULES}
    counts = {len(t.rows) for t in tallies.values()}
    assert len(counts) == 1 and counts.pop() > 20  # the same rows finish under every rule
    engine = tallies["engine"]
    assert engine.preemptions == 0
    assert all(r["kept"] >= bench.FLOOR for r in engine.rows)
    # Per-bucket plans of the RAP policy are not nested: rows keep their intersection.
    per_bucket = tallies["per-bucket"]
    assert per_bucket.grows > engine.grows
    assert sum(r["changes"] + r["preemptions"] for r in per_bucket.rows) > 0
