"""The one interface serving plans masks through (`rap.serving` sees planners only as this)."""

from __future__ import annotations

from typing import Any, Protocol

from rap.core.masks import KeepMask


class MaskPlanner(Protocol):
    """Plans masks from stored block scores or a trained policy, with no forward pass.

    `plan(budget_bytes, batch, seq, prefill_tokens)` returns a mask whose predicted peak
    (weights + KV for `seq` tokens + the activations of `prefill_tokens`, or of `seq` when None)
    at `batch` rows fits `budget_bytes`, else raises `BudgetError`. The mask's `source` names
    the planner (`controller:rap`, `controller:rap-fallback`, `controller:heuristic`); a replica
    relabels masks it plans for itself `local`. `describe()` is what operators see (kind,
    origin, decisions, fallbacks). `quality_cost(mask)` is the planner's predicted rise in ln
    perplexity over the dense model for `mask` (an estimate; None where the planner has no
    model of quality), which responses carry beside their fingerprint.
    """

    def plan(
        self, budget_bytes: int, batch: int, seq: int, prefill_tokens: int | None = None
    ) -> KeepMask: ...

    def describe(self) -> dict[str, Any]: ...

    def quality_cost(self, mask: KeepMask) -> float | None: ...
