"""RapPolicy on tiny exported networks: its own masks fit, STOP over budget falls back (counted)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import rap.planning.features
import rap.planning.heuristic
import rap.planning.planners
from rap.agent.env import Observer
from rap.core import byte_table
from rap.core.errors import BudgetError, RapError
from rap.core.scores import BlockScores
from rap.planning.policy import RapPolicy
from rap.planning.policy_net import PolicyNet
from tests.tiny import tiny_config

L = 4
N = 2 * L
MODEL = "tiny-llama"


@pytest.fixture(autouse=True)
def tiny_scores(monkeypatch: pytest.MonkeyPatch) -> None:
    scores = BlockScores(
        model=MODEL,
        model_digest="0" * 64,
        method="bi",
        num_layers=L,
        dtype="float32",
        calibration=None,
        attn=(0.1, 0.2, 0.3, 0.4),
        mlp=(0.5, 0.6, 0.7, 0.8),
        unit="test",
    )
    # Every module that looks stored scores up by name (planning reads them at call time).
    for module in (rap.planning.features, rap.planning.heuristic, rap.planning.planners):
        monkeypatch.setattr(module, "find_scores", lambda model_id, kind: scores)


def net_preferring(order: list[int], obs_dim: int, model: str = MODEL) -> PolicyNet:
    """A one-layer net whose outputs ignore x: action a scores order.index(a) (higher wins)."""
    bias = np.zeros(1 + N, dtype=np.float32)
    for rank, a in enumerate(order):
        bias[a] = rank + 1.0
    w = np.zeros((1 + N, obs_dim), dtype=np.float32)
    return PolicyNet([w], [bias], ["linear"], {"model": model, "scores": "bi", "algo": "test"})


@pytest.fixture
def cfg():
    return tiny_config("llama")


def tight(cfg, blocks: int) -> tuple[int, int, int, int]:
    obs = Observer(cfg, "float16", np.arange(N), 0.0)
    base, sizes = obs.table(4, 512, 256)
    return int(base + sizes.sum() - np.sort(sizes)[::-1][:blocks].sum()), 4, 512, 256


def tight_bucket(cfg, blocks: int) -> tuple[int, int, int]:
    """As `tight`, for the controller's bucket planning (no prompt activations counted)."""
    obs = Observer(cfg, "float16", np.arange(N), 0.0)
    base, sizes = obs.table(4, 512, None)
    return int(base + sizes.sum() - np.sort(sizes)[::-1][:blocks].sum()), 4, 512


def test_own_masks_fit_and_follow_the_network(cfg) -> None:
    dim = Observer(cfg, "float16", np.arange(N), 0.0).dim
    policy = RapPolicy(net_preferring([0, 1, 2, 3, 4, 5, 6, 7, 8], dim), cfg, MODEL, "float16")
    budget, b, s, p = tight(cfg, 2)
    mask = policy.plan(budget, b, s, p)
    assert byte_table.fits(
        cfg, mask, budget, b, s, "float16", include_activations=True, prefill_tokens=p
    )
    assert not mask.mlp[3]  # action 8 = block 7 = MLP of layer 3, the net's favourite
    assert policy.decisions == 1 and policy.fallbacks == 0


def test_stop_is_withheld_while_over_budget_so_a_stop_loving_net_still_fits(cfg) -> None:
    dim = Observer(cfg, "float16", np.arange(N), 0.0).dim
    policy = RapPolicy(net_preferring([8, 7, 0], dim), cfg, MODEL, "float16")  # STOP first
    budget, b, s, p = tight(cfg, 2)
    mask = policy.plan(budget, b, s, p)
    assert byte_table.fits(
        cfg, mask, budget, b, s, "float16", include_activations=True, prefill_tokens=p
    )
    assert not mask.mlp[2] and policy.fallbacks == 0  # its next choice (action 7) was taken


def test_an_agent_ending_over_budget_falls_back_and_is_counted(cfg, monkeypatch) -> None:
    """The fallback is a safety net (the action masks make it unreachable from a budget that
    some allowed mask meets): it plans mem-greedy, counts, and labels the mask."""
    dim = Observer(cfg, "float16", np.arange(N), 0.0).dim
    policy = RapPolicy(net_preferring([8], dim), cfg, MODEL, "float16")
    monkeypatch.setattr(policy, "choose", lambda *a: (np.ones(N, np.float32), False))
    budget, b, s = tight_bucket(cfg, 2)
    mask = policy.plan(budget, b, s)
    assert mask.source == "controller:rap-fallback"
    assert policy.fallbacks == 1 and policy.fallback_rate == 1.0
    assert "mem-greedy" in policy.last_fallback and policy.describe()["fallbacks"] == 1


@pytest.mark.parametrize("floor", [0.0, 0.5, 0.75])
def test_any_net_fits_every_budget_an_allowed_mask_meets(cfg, floor: float) -> None:
    """The feasibility mask: random networks, random budgets down to the floor's smallest
    peak, never a fallback, always a mask that fits and keeps the floor."""
    rng = np.random.default_rng(int(floor * 100))
    obs = Observer(cfg, "float16", np.arange(N), floor)
    for trial in range(40):
        order = [int(a) for a in rng.permutation(1 + N)]
        policy = RapPolicy(net_preferring(order, obs.dim), cfg, MODEL, "float16", floor)
        b, s = int(rng.choice([1, 4, 8])), int(rng.choice([256, 1024, 2048]))
        base, sizes = obs.table(b, s, None)
        lo = base + np.sort(sizes)[: N - obs.max_drops].sum()
        budget = int(lo + rng.uniform(0, 1) * (base + sizes.sum() - lo))
        mask = policy.plan(budget, b, s)
        assert policy.fallbacks == 0 and mask.source == "controller:rap", trial
        assert byte_table.fits(cfg, mask, budget, b, s, "float16", include_activations=True)
        assert mask.kept_fraction >= floor


def test_controller_masks_name_their_planner(cfg) -> None:
    from rap.planning import HeuristicPolicy

    dim = Observer(cfg, "float16", np.arange(N), 0.0).dim
    policy = RapPolicy(net_preferring([8, 7], dim), cfg, MODEL, "float16")
    budget, b, s = tight_bucket(cfg, 2)
    assert policy.plan(budget, b, s).source == "controller:rap"
    heuristic = HeuristicPolicy(cfg, MODEL, "float16", "mem-greedy")
    assert heuristic.plan(budget, b, s).source == "controller:heuristic"
    assert heuristic.describe()["decisions"] == 1 and policy.describe()["decisions"] == 1


def test_dense_fit_and_impossible_budgets_are_not_the_agents_decisions(cfg) -> None:
    dim = Observer(cfg, "float16", np.arange(N), 0.0).dim
    policy = RapPolicy(net_preferring([0], dim), cfg, MODEL, "float16", min_kept_fraction=0.9)
    assert policy.plan(10**12, 1, 8).kept_fraction == 1.0
    with pytest.raises(BudgetError):
        policy.plan(1, 4, 512, 256)
    assert policy.decisions == 0 and policy.fallbacks == 0


def test_wrong_model_or_shape_is_refused(cfg) -> None:
    dim = Observer(cfg, "float16", np.arange(N), 0.0).dim
    with pytest.raises(RapError, match="trained for"):
        RapPolicy(net_preferring([0], dim, model="other"), cfg, MODEL, "float16")
    with pytest.raises(RapError, match="features"):
        RapPolicy(net_preferring([0], dim + 1), cfg, MODEL, "float16")


def test_training_scores_in_the_export_win_over_stored_ones(cfg) -> None:
    """Observations must be those the network was trained on, even if scores are recomputed
    (the stored tiny scores rise with the block index; the export's fall)."""
    dim = Observer(cfg, "float16", np.arange(N), 0.0).dim
    net = net_preferring([0], dim)
    assert RapPolicy(net, cfg, MODEL, "float16").observer.ranks[0] == 0.0
    net.meta["importance"] = [float(N - i) for i in range(N)]
    policy = RapPolicy(net, cfg, MODEL, "float16")
    assert policy.observer.ranks.tolist() == pytest.approx([1 - i / (N - 1) for i in range(N)])


def test_export_round_trip_and_load(cfg, tmp_path: Path) -> None:
    dim = Observer(cfg, "float16", np.arange(N), 0.0).dim
    rng = np.random.default_rng(0)
    net = PolicyNet(
        [
            rng.normal(size=(16, dim)).astype(np.float32),
            rng.normal(size=(1 + N, 16)).astype(np.float32),
        ],
        [np.zeros(16, np.float32), np.zeros(1 + N, np.float32)],
        ["relu", "linear"],
        {"model": MODEL, "scores": "bi"},
    )
    net.save(tmp_path / "policy")
    again = PolicyNet.load(tmp_path / "policy")
    x = rng.normal(size=(5, dim)).astype(np.float32)
    assert np.allclose(net.forward(x), again.forward(x))
    assert again.num_params == 16 * dim + 16 + (1 + N) * 16 + 1 + N
    loaded = RapPolicy.load(tmp_path, cfg, MODEL, "float16")  # a `rap train --out` folder
    assert loaded.net.meta["model"] == MODEL
    with pytest.raises(RapError, match="no exported RAP policy"):
        RapPolicy.load(tmp_path / "nothing", cfg, MODEL, "float16")


@pytest.mark.slow
def test_default_policy_plans_for_the_default_model(capsys: pytest.CaptureFixture) -> None:
    """The shipped policy loads for `rap plan --method rap` and keeps inside every budget of
    held-out situations, with at most 1 % of its decisions falling back."""
    import json

    from rap.agent import scenarios, workloads
    from rap.cli.main import main
    from rap.core.loading import load_config

    assert (
        main(
            [
                "plan",
                "--method",
                "rap",
                "--budget-frac",
                "0.9",
                "--batch",
                "8",
                "--seq",
                "2048",
                "--json",
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["method"] == "rap" and report["predicted_bytes"] <= report["budget_bytes"]
    config, model_id = load_config("smollm2")
    policy = RapPolicy.load(None, config, model_id, "float16")
    for name in scenarios.names("validation"):
        for s in workloads.situations(name, config, "float16", scenarios.VALIDATION_SEED_BASE, 40):
            try:
                mask = policy.plan(s.budget_bytes, s.batch, s.seq, s.prefill)
            except BudgetError:
                continue
            assert byte_table.fits(
                config,
                mask,
                s.budget_bytes,
                s.batch,
                s.seq,
                "float16",
                include_activations=True,
                prefill_tokens=s.prefill,
            )
    assert policy.decisions > 50 and policy.fallback_rate <= 0.01
