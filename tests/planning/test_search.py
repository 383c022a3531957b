"""Search on the policy's reward (rap.planning.search): the MILP is the exact optimum of the
surrogate under the budget, and greedy and beam never beat it."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from rap.core import byte_table
from rap.core.loading import load_config
from rap.planning.search import SEARCHES, SurrogateSearch
from rap.planning.search_milp import solve
from rap.planning.surrogate import features, load_surrogate


@pytest.mark.parametrize("seed", range(6))
def test_the_milp_finds_the_brute_force_minimum_of_a_quadratic_surrogate(seed: int) -> None:
    """4 layers, 8 blocks, coefficients of both signs: all 256 drop sets enumerated."""
    rng = np.random.default_rng(seed)
    n2 = 8
    coef = np.concatenate([rng.uniform(0, 1, n2), rng.normal(0, 2, 7)])
    sizes = rng.uniform(1, 5, n2) * 2**20
    need, most = float(sizes.sum() * rng.uniform(0.2, 0.5)), int(rng.integers(3, 7))
    best = np.inf
    for bits in itertools.product([0.0, 1.0], repeat=n2):
        d = np.array(bits)
        if d @ sizes >= need and d.sum() <= most:
            best = min(best, float(features(d)[0] @ coef))
    d = solve(coef, sizes, need, most)
    assert d @ sizes >= need and d.sum() <= most
    assert float(features(d)[0] @ coef) == pytest.approx(best, abs=1e-6)


@pytest.fixture(scope="module")
def smollm2():
    return load_config("smollm2")


@pytest.mark.parametrize("share", [0.8, 0.7, 0.6])
def test_every_search_fits_and_none_beats_the_optimum(smollm2, share: float) -> None:
    config, model_id = smollm2
    sur = load_surrogate(model_id)
    dense = byte_table.byte_table(config, 8, 2048, "float16", True, 256).dense()
    budget = int(share * dense)
    cost = {}
    for method in SEARCHES:
        mask = SurrogateSearch(config, model_id, "float16", method, 0.5).plan(budget, 8, 2048, 256)
        assert byte_table.fits(
            config, mask, budget, 8, 2048, "float16", include_activations=True, prefill_tokens=256
        )
        assert mask.kept_fraction >= 0.5 and mask.source == "controller:search"
        cost[method] = float(sur.predict([mask.key])[0])
    assert cost["surrogate-milp"] <= cost["surrogate-beam"] + 1e-9
    assert cost["surrogate-milp"] <= cost["surrogate-greedy"] + 1e-9


def test_where_the_dense_model_fits_no_search_drops_a_block(smollm2) -> None:
    config, model_id = smollm2
    dense = byte_table.byte_table(config, 1, 512, "float16", True, 256).dense()
    for method in SEARCHES:
        mask = SurrogateSearch(config, model_id, "float16", method).plan(dense, 1, 512, 256)
        assert mask.kept_fraction == 1.0, method


def test_rap_plan_prices_every_method_the_same_way_and_prints_the_terms(capsys) -> None:
    """The policy counted a step's activations and gsi did not: two byte accountings in one
    table. Now every method is priced weights + KV + one step's activations."""
    from rap.cli.main import main

    reports = {}
    for method in ("gsi", "rap", "surrogate-milp"):
        args = ["plan", "--budget-frac", "0.8", "--batch", "8", "--seq", "2048"]
        assert main([*args, "--method", method, "--min-kept-fraction", "0.5", "--json"]) == 0
        reports[method] = json.loads(capsys.readouterr().out)
    dense = {r["dense_bytes"] for r in reports.values()}
    steps = {(r["prefill_tokens"], r["activation_bytes"]) for r in reports.values()}
    assert len(dense) == 1 and len(steps) == 1 and steps.pop()[0] == 256
    for r in reports.values():
        assert r["predicted_bytes"] == r["weight_bytes"] + r["kv_bytes"] + r["activation_bytes"]
        assert r["predicted_bytes"] <= r["budget_bytes"]
    best = reports["surrogate-milp"]["predicted_delta_lnppl"]
    assert all(best <= r["predicted_delta_lnppl"] + 1e-9 for r in reports.values())
