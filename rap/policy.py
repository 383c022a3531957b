"""Who chooses masks at serving time: a planner over stored block scores, or a trained policy.

`HeuristicPolicy` wraps `rap.planners.plan_mask` with the block scores that ship with the
package (no forward pass, well under a millisecond). It is what the controller uses until a
RAP policy checkpoint is configured, and what replicas use for their local fallback. Every mask
it returns fits: peak (weights + KV for the whole length + activations) ≤ budget, or it raises
`BudgetError`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rap.masks import KeepMask


@dataclass
class HeuristicPolicy:
    """mem-greedy (or another stored-score planner) at serving time."""

    config: Any
    model_id: str
    dtype: Any
    method: str = "mem-greedy"
    min_kept_fraction: float = 0.0
    scores: Any = None

    def __post_init__(self) -> None:
        """Load the stored scores once (the planner would otherwise look them up per call):
        the planner's own kind first, then any other kind stored for the model. A model with
        none fails here, at start-up, with the command that makes them."""
        from rap.errors import RapError
        from rap.importance import find_scores
        from rap.planners import SCORES_FOR

        if self.scores is not None or self.method not in SCORES_FOR:
            return
        preferred = SCORES_FOR[self.method]
        kinds = [preferred] + [k for k in ("gsi", "oneshot", "bi", "magnitude") if k != preferred]
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
        """A mask whose predicted peak at (batch, seq) fits `budget_bytes`, or `BudgetError`."""
        from rap.planners import plan_mask

        return plan_mask(
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

    def for_admission(self, budget: int, batch: int, seq: int, prefill: int) -> KeepMask:
        return self.plan(budget, batch, seq, prefill)

    def for_bucket(self, budget: int, batch: int, seq: int) -> KeepMask:
        return self.plan(budget, batch, seq)
