"""Which policy the controller serves: chosen from the app config, validated before Ray starts,
and named wherever operators look (no Ray here; the live app is tested in test_serve_e2e)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from rap.core.errors import RapError
from rap.planning import DEFAULT_POLICY_DIR, HeuristicPolicy, RapPolicy, choose_policy
from rap.planning.choice import DEFAULT_MODEL_SEARCH
from rap.serving.config import ServeAppConfig, controller_policy

DEFAULT_ID = "SmolLM2-135M-Instruct"
ROOT = Path(__file__).resolve().parents[2]


def test_policy_setting_maps_to_a_planner() -> None:
    default = choose_policy("default", "mem-greedy", DEFAULT_ID)
    assert default.kind == "heuristic" and default.planner == DEFAULT_MODEL_SEARCH
    shipped = choose_policy("rap", "mem-greedy", DEFAULT_ID)
    assert shipped.kind == "rap" and shipped.path is None
    other = choose_policy("default", "mem-greedy", "some-other-model")
    assert other.kind == "heuristic" and other.planner is None
    assert "no RAP policy ships" in other.origin
    assert choose_policy(None, "gsi", DEFAULT_ID).kind == "heuristic"
    path = choose_policy("/runs/x/policy", "mem-greedy", DEFAULT_ID)
    assert path.kind == "rap" and path.path == "/runs/x/policy"


def test_the_default_is_the_test_splits_winner() -> None:
    """The project's rule: the controller's default is whichever wins on the test split. The
    final run's figures decide it (bench/pairwise.py): search beats the policy there with an
    interval above 0, and no method with a lower mean is separated from the cheaper default."""
    spec = importlib.util.spec_from_file_location("pairwise", ROOT / "bench" / "pairwise.py")
    assert spec and spec.loader
    pairwise = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pairwise)
    doc = json.loads((ROOT / "bench" / "results" / "compare_test.json").read_text())
    assert doc["split"] == "test"
    name, _ = pairwise.winner(doc)
    assert name == DEFAULT_MODEL_SEARCH
    assert pairwise.against(doc, "rap", name)["ci95"][0] > 0  # the policy is worse
    search = controller_policy(ServeAppConfig().resolved())
    d = search.describe()
    assert d["kind"] == "SurrogateSearch" and d["planner"] == DEFAULT_MODEL_SEARCH
    assert d["fallbacks"] == 0 and "test split" in d["origin"]


def test_the_shipped_rap_policy_serves_at_the_serving_floor() -> None:
    cfg = ServeAppConfig(policy="rap").resolved()
    policy = controller_policy(cfg)
    assert isinstance(policy, RapPolicy)
    d = policy.describe()
    assert d["kind"] == "RapPolicy" and str(DEFAULT_POLICY_DIR) in d["origin"]
    assert "shipped with the package" in d["origin"] and "default" not in d["origin"]
    assert policy.min_kept_fraction == cfg.engine.min_kept_fraction == 0.5
    assert policy.dtype == "float32" and d["decisions"] == 0 and d["fallbacks"] == 0
    heuristic = controller_policy(ServeAppConfig(policy=None).resolved())
    assert isinstance(heuristic, HeuristicPolicy) and "policy: null" in heuristic.origin


def test_unknown_planner_fails_where_the_config_is_built_and_a_missing_policy_on_load() -> None:
    """A policy path is checked where the policy loads (a config for a cluster names paths on
    the cluster's volumes: `k8s/overlay`), which `rap serve` and `build_app` do up front."""
    with pytest.raises(ValidationError, match="unknown planner 'greedy'"):
        ServeAppConfig(planner="greedy")
    with pytest.raises(RapError, match="holds no exported RAP policy"):
        controller_policy(ServeAppConfig(policy="/nowhere/policy").resolved())


def test_a_policy_that_cannot_load_is_one_error_line(tmp_path: Path) -> None:
    bad = tmp_path / "policy"
    bad.mkdir()
    meta = json.loads((DEFAULT_POLICY_DIR / "rap-policy.json").read_text())
    (bad / "rap-policy.json").write_text(json.dumps(meta))
    (bad / "policy.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(RapError, match="cannot be loaded") as info:
        controller_policy(ServeAppConfig(policy=str(bad)).resolved())
    assert "\n" not in str(info.value)


def test_rap_serve_refuses_a_bad_policy_before_ray_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from rap.cli.main import main

    assert main(["serve", "--policy", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds no exported RAP policy" in err[0], err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["serve", "--policy", str(empty)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no exported RAP policy" in err[0], err


def test_planners_predict_the_quality_cost_of_a_mask_from_the_shipped_surrogate() -> None:
    """What responses carry beside their fingerprint (an estimate, Δ ln perplexity)."""
    from rap.core.loading import DEFAULT_MODEL_ID
    from rap.core.masks import KeepMask
    from rap.planning.surrogate import predicted_delta_lnppl

    n = 30
    small = KeepMask.from_drops(DEFAULT_MODEL_ID, n, drop_attn="5-9", drop_mlp="20")
    cost = predicted_delta_lnppl(DEFAULT_MODEL_ID, small.key)
    fewer = predicted_delta_lnppl(DEFAULT_MODEL_ID, small.without(("mlp", 21)).key)
    assert cost is not None and fewer is not None and 0 < cost < fewer
    assert predicted_delta_lnppl(DEFAULT_MODEL_ID, "") == 0.0
    assert predicted_delta_lnppl("no-such-model", small.key) is None


def test_the_app_config_can_choose_search_on_the_surrogate_for_the_controller() -> None:
    """`policy: null, planner: surrogate-greedy`: the controller and the replicas' local planner
    search the surrogate; its masks cross processes as `controller:search`."""
    from rap.core.masks import KeepMask
    from rap.planning.search import SurrogateSearch
    from rap.serving.controller import Controller
    from tests.serving.test_controller import tel

    cfg = ServeAppConfig(policy=None, planner="surrogate-greedy").resolved()
    search = controller_policy(cfg)
    assert isinstance(search, SurrogateSearch) and search.min_kept_fraction == 0.5
    plan = Controller(search, cfg.controller).report(tel(budget=600 * 2**20), now_s=1000.0)
    assert plan is not None and plan.entries
    for entry in plan.entries:
        again = KeepMask.model_validate(entry.mask.model_dump())  # what a replica validates
        assert again.source == "controller:search" and again.kept_fraction >= 0.5


def test_rap_serve_refuses_a_corrupt_scores_file_before_ray_starts(
    tiny_dirs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A model without shipped scores reads them from the cache: a corrupt file there is one
    error line naming it, before Ray starts (the campaign's fault: corrupt files at start)."""
    from rap.cli.main import main
    from rap.core.scores import METHODS

    monkeypatch.setenv("RAP_CACHE_DIR", str(tmp_path))
    folder = tmp_path / "scores" / "0123abcd"
    folder.mkdir(parents=True)
    for method in METHODS:
        (folder / f"{method}-c4-x.json").write_text('{"format": "rap-block-scores/1", "attn": [')
    model = str(next(iter(tiny_dirs.values())))
    assert main(["serve", "--model", model, "--policy", "none"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a valid block-score file" in err[0], err
    assert str(folder) in err[0]
