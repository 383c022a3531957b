"""Every planner by name, behind the one `MaskPlanner` interface, so that `rap plan`, `rap eval`
and the comparison price and plan every method the same way: weights + KV at (B, S) + the
activations of batch × `prefill_tokens` prompt tokens, `plan(budget, batch, seq, prefill)`.

    stored-score planners  `SERVING_PLANNERS` (gsi, mem-greedy, ...) through `HeuristicPolicy`
    search                 `SEARCHES` (surrogate-greedy, -beam, -milp) through `SurrogateSearch`
    rap                    the trained policy (`RapPolicy`; `policy`: an exported folder, None:
                           the shipped one)
"""

from __future__ import annotations

from typing import Any

from rap.core.errors import RapError
from rap.planning.heuristic import HeuristicPolicy
from rap.planning.planners import SERVING_PLANNERS
from rap.planning.policy import RapPolicy
from rap.planning.search import SEARCHES, SurrogateSearch

METHODS = (*SERVING_PLANNERS, *SEARCHES, "rap")
ServingPolicy = HeuristicPolicy | RapPolicy | SurrogateSearch


def make_planner(
    method: str,
    config: Any,
    model_id: str,
    dtype: Any,
    min_kept_fraction: float = 0.0,
    policy: str | None = None,
    origin: str | None = None,
) -> ServingPolicy:
    """The planner called `method` (module doc), or a `RapError` naming the known ones.
    `origin`: why this planner, for operators (`describe()`; the default names the method)."""
    if method == "rap":
        return RapPolicy.load(policy, config, model_id, dtype, min_kept_fraction)
    if method in SEARCHES:
        why = origin or f"search on the surrogate ({method})"
        return SurrogateSearch(config, model_id, dtype, method, min_kept_fraction, origin=why)
    if method in SERVING_PLANNERS:
        why = origin or "heuristic planner"
        return HeuristicPolicy(config, model_id, dtype, method, min_kept_fraction, origin=why)
    raise RapError(f"unknown method {method!r}", expected=f"some of {', '.join(METHODS)}")
