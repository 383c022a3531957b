"""`rap heldout` end to end on a tiny model: one window per domain, the masks `rap plan` gives,
results as JSON and Markdown, a second run from the cache alone; bad flags are one line."""

from __future__ import annotations

import json

import pytest

from rap.cli.main import main


@pytest.fixture
def tiny_with_scores(tiny_dirs, tmp_path, monkeypatch) -> str:
    monkeypatch.setenv("RAP_CACHE_DIR", str(tmp_path / "cache"))
    model = str(tiny_dirs["llama"])
    imp = ["importance", "--model", model, "--method", "bi", "--tokens", "256", "--seq-len", "64"]
    assert main(imp) == 0  # attn-drop reads Block Influence from the cache
    return model


def _plan(model: str, method: str, capsys) -> str:
    capsys.readouterr()
    args = ["plan", "--model", model, "--method", method, "--budget-frac", "0.9"]
    assert main([*args, "--batch", "2", "--seq", "64", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    return ",".join(
        [f"a{i}" for i, k in enumerate(out["attn"]) if not k]
        + [f"m{i}" for i, k in enumerate(out["mlp"]) if not k]
    )


def test_one_window_per_domain_end_to_end_then_from_the_cache(tiny_with_scores, tmp_path, capsys):
    model = tiny_with_scores
    out = tmp_path / "heldout"
    args = ["heldout", "--model", model, "--methods", "random,attn-drop", "--budgets", "0.9"]
    args += ["--shape", "2x64", "--domains", "code,multilingual", "--max-windows", "1"]
    args += ["--draws", "200", "--out", str(out)]
    assert main(args) == 0
    first = capsys.readouterr().out
    result = json.loads((out / "results.json").read_text())
    assert result["window"] == 64 and result["shape"] == {"batch": 2, "seq": 64}
    assert set(result["domains"]) == {"code", "multilingual"}
    assert all(len(v) == 1 for v in result["nll"][""].values())
    assert "--max-windows 1" in result["domains"]["code"]["shortfall"]
    rows = {r["method"]: r for r in result["rows"]}
    for method, row in rows.items():
        assert row["key"] == _plan(model, method, capsys)  # the mask `rap plan` gives
        assert set(row["delta"]) == {"code", "multilingual"}
        assert row["mean"] == row["delta"]["code"]  # multilingual stays out of the mean
        assert row["vs_best"]["code"][0] >= 0.0 and row["best"] in rows
    table = (out / "results.md").read_text()
    assert "| code | held-out | 1 |" in table and "Budget 90%" in table
    assert len({r["key"] for r in rows.values()} - {""}) == 2
    assert "measured 6 windows" in first  # (dense + two distinct masks) × one window × 2 domains
    assert main(args) == 0
    assert "measured 0 windows" in capsys.readouterr().out
    assert json.loads((out / "results.json").read_text())["rows"] == result["rows"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--split", "test"], "--split test is the final judgement's text"),
        (["--domains", "poetry"], "unknown domain 'poetry'"),
        (["--shape", "8by2048"], "--shape '8by2048' is not BxS"),
        (["--methods", "oracle"], "unknown method 'oracle'"),
        (["--budgets", "1.5"], "budget 1.5 is outside (0, 1]"),
    ],
)
def test_bad_flags_are_one_line_before_any_model_loads(extra, message, capsys) -> None:
    assert main(["heldout", "--model", "no-such-model", *extra, "--out", "x"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
