"""`HeuristicPolicy`: a stored-score planner (`rap.planning.planners`, mem-greedy by default) as
a `MaskPlanner`. It wraps `plan_mask` with the block scores that ship with the package (no
forward pass, well under a millisecond); the controller runs it where no RAP policy is chosen
(`rap.planning.choice`), replicas use it for their local fallback, and the RAP policy falls back
to it. Every mask it returns fits: peak (weights + KV for the whole length + activations) ≤
budget, or it raises `BudgetError`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rap.core.errors import RapError
from rap.core.masks import KeepMask
from rap.core.scores import METHODS, find_scores
from rap.planning.planners import SCORES_FOR, plan_mask
from rap.planning.surrogate import predicted_delta_lnppl


@dataclass
class HeuristicPolicy:
    """mem-greedy (or another stored-score planner) at serving time."""

    config: Any
    model_id: str
    dtype: Any
    method: str = "mem-greedy"
    min_kept_fraction: float = 0.0
    scores: Any = None
    origin: str = "heuristic planner"
    decisions: int = 0

    def __post_init__(self) -> None:
        """Load the stored scores once (the planner would otherwise look them up per call):
        the planner's own kind first, then any other kind stored for the model. A model with
        none fails here, at start-up, with the command that makes them."""
        if self.scores is not None or self.method not in SCORES_FOR:
            return
        preferred = SCORES_FOR[self.method]
        kinds = [preferred] + [k for k in METHODS if k != preferred]
        for kind in kinds:
            try:
                self.scores = find_scores(self.model_id, kind)
                return
            except RapError:
                continue
        self.scores = find_scores(self.model_id, preferred)  # raises, naming the fix

    def plan(
        self, budget_bytes: int, batch: int, seq: int, prefill_tokens: int | None = None
    ) -> KeepMask:
        """A mask whose predicted peak at (batch, seq) fits `budget_bytes` (`MaskPlanner`),
        labelled `controller:heuristic`, or `BudgetError`."""
        mask = plan_mask(
            self.method,
            self.config,
            self.model_id,
            budget_bytes,
            batch,
            seq,
            self.dtype,
            self.scores,
            include_activations=True,
            prefill_tokens=prefill_tokens,
            min_kept_fraction=self.min_kept_fraction,
        )
        self.decisions += 1
        return mask.model_copy(update={"source": "controller:heuristic"})

    def quality_cost(self, mask: KeepMask) -> float | None:
        """Predicted Δ ln perplexity of `mask` from the shipped surrogate (None without one)."""
        return predicted_delta_lnppl(self.model_id, mask.key)

    def describe(self) -> dict[str, Any]:
        """What operators see (`/admin/state`, logs, `rap serve`)."""
        return {
            "kind": "HeuristicPolicy",
            "planner": self.method,
            "origin": self.origin,
            "decisions": self.decisions,
            "fallbacks": 0,
            "fallback_rate": 0.0,
            "last_fallback": "",
        }
