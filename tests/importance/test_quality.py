"""Measured perplexity under masks (cached) and the surrogate fitted to it."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from rap.agent import surrogate_fit
from rap.core.errors import RapError
from rap.core.loading import load_model
from rap.core.masks import key_for
from rap.importance import quality
from rap.planning import surrogate


def test_sampled_masks_are_seeded_and_include_every_single_drop() -> None:
    scores = {(k, i): float(i) for i in range(5) for k in ("attn", "mlp")}
    a = quality.sample_keys(scores, 30, seed=1, max_drops=4)
    assert a == quality.sample_keys(scores, 30, seed=1, max_drops=4)
    assert a != quality.sample_keys(scores, 30, seed=2, max_drops=4)
    singles = {k for k in a if "," not in k}
    assert len(singles) == 10
    assert all(len(k.split(",")) <= 4 for k in a)


def test_meter_measures_once_and_caches(tiny_dirs, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("RAP_CACHE_DIR", str(tmp_path))
    model = load_model(str(tiny_dirs["llama"]))
    meter = quality.Meter(model, "fit")
    dense, dropped = meter.lnppl(""), meter.lnppl("a1,m2")
    assert math.isfinite(dense) and dropped != dense
    runs = meter.ev.runs
    assert meter.lnppl("a1,m2") == dropped and meter.ev.runs == runs  # cached in memory
    again = quality.Meter(model, "fit")  # and on disk
    assert again.known == {"": dense, "a1,m2": dropped}
    assert quality.read_cache(model.model_id, "fit")["a1,m2"] == dropped


def test_the_served_part_is_measured_in_windows_longer_than_any_served_sequence(
    tiny_dirs,
) -> None:
    """`rap bench`'s measured quality: tokens after the eval and fit parts, in 1,024-token
    windows (the bench serves at most 512 + 96 tokens a row)."""
    model = load_model(str(tiny_dirs["llama"]))
    lo, hi = quality.PARTS["served"]
    assert lo >= max(h for p, (_, h) in quality.PARTS.items() if p != "served")
    ids = quality.part_ids(model, "served")
    assert tuple(ids.shape) == ((hi - lo) * quality.SEQ_LEN // 1024, 1024)
    fit = quality.part_ids(model, "fit")
    assert tuple(fit.shape) == (8, quality.SEQ_LEN)  # the other parts are as they were


def test_surrogate_recovers_a_compounding_truth_on_held_out_masks() -> None:
    rng = np.random.default_rng(0)
    n_layers = 6
    cost = rng.uniform(0.0, 0.5, 2 * n_layers)
    blocks = quality_blocks(n_layers)
    keys = [key_for([b]) for b in blocks]
    while len(keys) < 200:
        pick = rng.permutation(len(blocks))[: int(rng.integers(2, 7))]
        keys.append(key_for(blocks[i] for i in pick))
    keys = list(dict.fromkeys(keys))

    def truth(key: str) -> float:
        d = surrogate.drop_vector(key, n_layers)
        return 3.0 + float(np.expm1(d @ cost * (1 + 0.05 * d.sum())))

    train, test = surrogate_fit.split(keys, 0.3, seed=0)
    model = surrogate_fit.fit(train, [truth(k) for k in train], 3.0, n_layers, lam=0.01)
    report = surrogate_fit.evaluate(model, test, [truth(k) for k in test])
    assert report["spearman"] > 0.95
    assert report["mae_lnppl"] < 0.1
    assert model.lnppl(np.zeros(2 * n_layers)) == pytest.approx(3.0, abs=0.05)


def quality_blocks(n_layers: int) -> list[tuple[str, int]]:
    return [(k, i) for i in range(n_layers) for k in ("attn", "mlp")]


def test_shipped_surrogate_loads_for_the_default_model() -> None:
    s = surrogate.load_surrogate()
    assert s.num_layers == 30 and len(s.coef) == 60 + len(surrogate.EXTRA)
    dense = s.lnppl(np.zeros(60))
    one = np.zeros(60)
    one[30] = 1.0  # the MLP of layer 0, by far the most important block measured
    assert s.lnppl(one) > dense + 1.0
    report = s.meta["report"]
    assert isinstance(report, dict) and report["held_out"]["all"]["spearman"] > 0.8


def test_shipped_fit_table_covers_every_single_drop_on_the_current_text() -> None:
    table = quality.load_table()  # raises if it was measured on another part of the text
    singles = [k for k in table if k and "," not in k]
    assert "" in table and len(singles) == 60
    assert sum("," in k for k in table) >= 200


def test_a_table_measured_on_other_tokens_is_refused(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(quality, "DATA_DIR", tmp_path)
    monkeypatch.setenv("RAP_CACHE_DIR", str(tmp_path))
    doc = {"text": {"chunks": [0, 2]}, "lnppl": {"": 3.0}}
    quality.table_path("m", "fit").write_text(json.dumps(doc))
    with pytest.raises(RapError, match=r"chunks \[0, 2\].*re-measure"):
        quality.load_table("m", "fit")
    lo, hi = quality.PARTS["fit"]
    assert quality.cache_path("m", "fit").name == f"m.fit.{lo}-{hi}.jsonl"  # never mixes texts


def test_surrogate_check_reports_its_bias_on_measured_masks(tmp_path, monkeypatch) -> None:
    keys = ["a5", "a5,a7", "a3,a5,a7"]
    s = surrogate.load_surrogate()
    true = s.predict(keys) + 0.2  # masks the surrogate flatters by 0.2 nats
    table = {"": s.dense_lnppl, **dict(zip(keys, true, strict=True))}
    monkeypatch.setattr(surrogate_fit, "load_table", lambda *_: table)
    path = tmp_path / "keys.txt"
    path.write_text("\n".join(keys) + "\n")
    report = surrogate_fit.check(surrogate_fit.DEFAULT_MODEL_ID, path)["all"]
    assert report["bias_lnppl"] == pytest.approx(-0.2) and report["masks"] == 3
    path.write_text("a5\nm0,m1\n")
    with pytest.raises(RapError, match=r"1 of 2 masks.*not measured"):
        surrogate_fit.check(surrogate_fit.DEFAULT_MODEL_ID, path)


def _ship(tmp_path, monkeypatch, table: dict[str, float]) -> None:
    """A shipped table in a scratch data folder, and an empty cache."""
    monkeypatch.setattr(quality, "DATA_DIR", tmp_path / "data")
    monkeypatch.setenv("RAP_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "data").mkdir()
    lo, hi = quality.PARTS["fit"]
    doc = {"text": {"chunks": [lo, hi]}, "lnppl": table}
    quality.table_path("m", "fit").write_text(json.dumps(doc))


def _cache(key: str, lnppl: float) -> None:
    path = quality.cache_path("m", "fit")
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps({"key": key, "lnppl": lnppl}) + "\n")


def test_export_merges_new_measurements_into_the_shipped_table(tmp_path, monkeypatch) -> None:
    """docs/agent.md's recipe on a fresh machine: two new masks measured, then export. It once
    replaced a 756-mask table with the cache's 3 masks."""
    shipped = {"": 3.0, "a0": 3.1, "m0": 3.5, "a0,m1": 3.9}
    _ship(tmp_path, monkeypatch, shipped)
    _cache("", 3.0)
    _cache("a1,a2", 3.4)
    _cache("a0", 3.12)  # a re-measurement wins
    path, before, after = quality.export("m", "fit")
    table = json.loads(path.read_text())["lnppl"]
    assert (before, after) == (4, 5) and set(table) == {*shipped, "a1,a2"}
    assert table["a0"] == 3.12
    assert quality.main(["export", "--part", "fit", "--model-id", "m"]) == 0


def test_export_refuses_to_shrink_the_table_unless_told(tmp_path, monkeypatch, capsys) -> None:
    _ship(tmp_path, monkeypatch, {"": 3.0, "a0": 3.1, "m0": 3.5})
    lo, hi = quality.PARTS["fit"]
    doc = {"text": {"chunks": [lo, hi]}, "lnppl": {"": 3.0, "a0": 3.1, "m0": 3.5}}
    _cache("a1", 3.2)
    _, before, after = quality.export("m", "fit", replace=True)  # told: the cache alone
    assert (before, after) == (3, 1)
    quality.table_path("m", "fit").write_text(json.dumps(doc))
    # Merging never shrinks a table it can read; the guard is for one it reads as empty.
    monkeypatch.setattr(quality, "read_shipped", lambda *_: {})
    with pytest.raises(RapError, match=r"shrink .* from 3 to 1 masks"):
        quality.export("m", "fit")
    assert quality.main(["export", "--part", "fit", "--model-id", "m"]) == 2
    assert "shrink" in capsys.readouterr().err


def test_refit_on_too_few_masks_says_so(tmp_path, monkeypatch, capsys) -> None:
    table = {"": 3.0, "a1,a2": 3.4, "m3": 3.3}
    monkeypatch.setattr(surrogate_fit, "load_table", lambda *_: dict(table))
    with pytest.raises(RapError, match=r"holds 3 masks .*single drops: 1 of 8.*multi-block: 1"):
        surrogate_fit.fit_and_report("m")
    assert surrogate_fit.main(["m"]) == 2
    err = capsys.readouterr().err
    assert "too few to fit" in err and "Traceback" not in err
