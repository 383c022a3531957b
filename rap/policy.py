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
    scores_method: str = "oneshot"
    """Which stored importance scores the planner ranks blocks by."""

    def __post_init__(self) -> None:
        from rap.loading import DEFAULT_MODEL_ID

        if self.scores is None and self.model_id == DEFAULT_MODEL_ID:
            from rap.planners import load_default_scores

            self.scores = load_default_scores(self.scores_method)

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
