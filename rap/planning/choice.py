"""Which planner the controller runs: the app's `policy` setting → a loaded `MaskPlanner`.

`default` → the RAP policy shipped for the default model (the heuristic planner for other
models, none ships for them); a path → that exported policy; None → the heuristic planner.
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
    """Where it comes from, for operators: the shipped default, a path, or why the heuristic."""
    path: str | None = None
    """The exported policy to load (None: the shipped default, for kind "rap")."""


def choose_policy(policy: str | None, planner: str, model_id: str) -> PolicyChoice:
    """`policy: default` → the RAP policy shipped for the default model (the heuristic planner
    for other models); a path → that exported policy; None → the heuristic planner."""
    if policy is None:
        return PolicyChoice("heuristic", f"policy: null in the app config ({planner})")
    if policy != "default":
        return PolicyChoice("rap", f"exported policy {policy}", policy)
    if model_id == DEFAULT_MODEL_ID:
        return PolicyChoice("rap", "shipped default", None)
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
        return make_planner(
            planner, config, model_id, dtype, min_kept_fraction, origin=choice.origin
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
