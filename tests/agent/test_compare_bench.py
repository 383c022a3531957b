"""bench/compare_policies.py's situation-by-situation statistics (the script is run by hand)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(ROOT / "bench"))  # as when run as a script: its sibling modules
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


def test_the_test_split_is_read_once_per_policy_and_only_with_final(bench, tmp_path) -> None:
    import ledger

    path = tmp_path / "ledger.jsonl"
    assert "add --final" in ledger.check_split("test", False, "abc", path)
    assert "--split test" in ledger.check_split("validation", True, "abc", path)
    assert ledger.check_split("validation", False, "abc", path) is None
    assert ledger.check_split("test", True, "abc", path) is None
    ledger.append({"split": "test", "final": True, "policy_digest": "abc"}, path)
    ledger.append({"split": "validation", "final": False, "policy_digest": "abc"}, path)
    assert "already had its final run" in ledger.check_split("test", True, "abc", path)
    assert ledger.check_split("test", True, "def", path) is None  # another policy: its own run
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    assert [r["split"] for r in rows] == ["test", "validation"] and all(r["commit"] for r in rows)


def test_the_comparison_refuses_the_test_split_without_final(bench, monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", ["compare_policies.py", "--split", "test"])
    with pytest.raises(SystemExit) as exc:
        bench.main()
    assert exc.value.code == 2


def test_splits_never_share_a_scenario_or_a_seed() -> None:
    from rap.agent import scenarios

    names = {s: set(scenarios.names(s)) for s in ("train", "validation", "test")}
    assert all(names.values())
    assert not (names["train"] & names["validation"] or names["validation"] & names["test"])
    assert not names["train"] & names["test"]
    base = scenarios.SEED_BASE
    assert base["train"] < base["validation"] < base["test"]
    assert base["validation"] - base["train"] >= 1000 and base["test"] - base["validation"] >= 1000
