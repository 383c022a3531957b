"""Which planner the controller runs: the app's `policy` setting → a loaded `MaskPlanner`.

default  the default model: `DEFAULT_MODEL_SEARCH`, what won on the test split; other
         models: the app's heuristic `planner` (no policy or surrogate ships for them)
rap      the RAP policy shipped for the default model
a path   that exported policy (`rap train --out DIR`)
None     the app's `planner` (a stored-score planner or a search on the surrogate)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from rap.core.errors import RapError
from rap.core.loading import DEFAULT_MODEL_ID
from rap.planning.policy import RapPolicy
from rap.planning.registry import ServingPolicy, make_planner


@dataclass(frozen=True)
class PolicyChoice:
    """Which planner the controller runs and why, decided from the app's `policy` setting."""

    kind: Literal["rap", "heuristic"]
    origin: str
    """Where it comes from, for operators: the package, a path, or why the heuristic."""
    path: str | None = None
    """The exported policy to load (None: the one shipped with the package, for kind "rap")."""
    planner: str | None = None
    """For kind "heuristic": the planner to run instead of the app's `planner` (None: that)."""


DEFAULT_MODEL_SEARCH = "surrogate-greedy"
"""What `policy: default` runs for the default model, by the project's rule (the controller's
default is whichever wins on the test split). On the test split (docs/results.md, "The final
run"; bench/results/compare_test.json) search on the surrogate beats the shipped RAP policy:
rap − surrogate-greedy = +0.015 Δ ln ppl [+0.004, +0.025]. Among the searches no interval
separates them (beam − greedy −0.003 [−0.010, +0.002], the same mask in 101 of 120 situations:
`python bench/pairwise.py`), and greedy plans in 0.8 ms against beam's 15 ms. Checked against
that file by tests/planning/test_serving_policy.py."""


def choose_policy(policy: str | None, planner: str, model_id: str) -> PolicyChoice:
    """The app's `policy` setting → which planner the controller runs (module doc)."""
    if policy is None:
        return PolicyChoice("heuristic", f"policy: null in the app config ({planner})")
    if policy == "rap":
        return PolicyChoice("rap", "shipped with the package", None)
    if policy != "default":
        return PolicyChoice("rap", f"exported policy {policy}", policy)
    if model_id == DEFAULT_MODEL_ID:
        why = (
            f"policy: default ({DEFAULT_MODEL_SEARCH}, the test split's winner over the RAP policy)"
        )
        return PolicyChoice("heuristic", why, planner=DEFAULT_MODEL_SEARCH)
    return PolicyChoice("heuristic", f"no RAP policy ships for {model_id} ({planner})")


def build_policy(
    choice: PolicyChoice,
    config: Any,
    model_id: str,
    dtype: Any,
    planner: str,
    min_kept_fraction: float,
) -> ServingPolicy:
    """The controller's policy object; a policy that cannot load raises one `RapError` line."""
    if choice.kind == "heuristic":  # a stored-score planner or search, by the `planner` name
        method = choice.planner or planner
        return make_planner(
            method, config, model_id, dtype, min_kept_fraction, origin=choice.origin
        )
    try:
        return RapPolicy.load(choice.path, config, model_id, dtype, min_kept_fraction)
    except RapError:
        raise
    except Exception as exc:  # a corrupt file: one line naming it, not a traceback
        raise RapError(
            f"the RAP policy ({choice.origin}) cannot be loaded: {type(exc).__name__}: {exc}",
            expected="an exported policy folder written by `rap train`",
            fix="re-export it, point `policy` at another one, or set `policy: null`",
        ) from None
