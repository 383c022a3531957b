"""bench/compare_policies.py's situation-by-situation statistics (the script is run by hand)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("compare", ROOT / "bench" / "compare_policies.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_paired_counts_wins_and_bounds_the_mean_difference(bench) -> None:
    q = {"": 3.0, "a": 3.1, "b": 3.2, "c": 3.3}
    rows = {
        "rap": [{"key": "a"}, {"key": "a"}, {"key": "c"}, {"key": "a"}],
        "other": [{"key": "b"}, {"key": "a"}, {"key": "b"}, {"key": None, "error": "no fit"}],
    }
    r = bench.paired(rows, q)["other"]
    assert (r["n"], r["better"], r["worse"]) == (3, 1, 1)  # the unplanned situation is left out
    assert r["mean_diff"] == pytest.approx(0.0)
    assert r["ci95"][0] <= 0.0 <= r["ci95"][1]
    assert "rap" not in bench.paired(rows, q)
