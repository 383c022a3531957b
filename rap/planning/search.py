"""Search on the RAP policy's own reward: the shipped perplexity surrogate under the same bytes.

The policy is trained to keep the surrogate's predicted rise in ln perplexity low while the mask
fits (`rap.agent.env`). Whether reinforcement learning earns its place is whether it beats plain
search on that same objective with the same byte accounting, so these planners search it:

    minimise   Δ̂(d) = expm1(max(g(d), 0)),  g(d) = coef · [d, φ(d)/10]   (`rap.planning.surrogate`)
    subject to base + Σ_j bytes_j (1 − d_j) ≤ budget,  Σ_j d_j ≤ max_drops(floor)

with d ∈ {0,1}^{2L} the dropped blocks and bytes from `rap.core.byte_table` at (B, S) with the
activations of `prefill_tokens` counted — the table the policy observes (`Observer.table`).

    surrogate-greedy  one block at a time, the least Δ̂ increase per useful byte freed
                      (Δ̂(d + e_j) − Δ̂(d)) / min(bytes_j, deficit), until the mask fits
    surrogate-beam    the `width` (8) drop sets of least Δ̂ per byte freed kept at each depth,
                      every block tried from each; the fitting set of least Δ̂ reached
    surrogate-milp    the exact optimum: g is quadratic in d (squared and crossed counts of
                      dropped attention and MLP blocks, adjacent and same-layer pairs, depth), so
                      a mixed-integer linear program finds the minimum of g, hence of Δ̂ — the
                      counts as one joint one-hot y_{k,l} (k attention and l MLP blocks dropped),
                      each pair product p = x·z by p ≤ x, p ≤ z, p ≥ x + z − 1
                      (`scipy.optimize.milp`, HiGHS). The only planner here that may be called
                      the optimum, and only of the surrogate: measured perplexity may differ.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from rap.core.byte_table import byte_table
from rap.core.errors import BudgetError
from rap.core.masks import KeepMask, max_drops
from rap.planning.surrogate import Surrogate, features, load_surrogate, predicted_delta_lnppl

SEARCHES = ("surrogate-greedy", "surrogate-beam", "surrogate-milp")


@dataclass
class SurrogateSearch:
    """A `MaskPlanner` that searches the surrogate (module doc); `method` picks the search."""

    config: Any
    model_id: str
    dtype: Any
    method: str = "surrogate-greedy"
    min_kept_fraction: float = 0.0
    width: int = 8
    decisions: int = 0
    origin: str = "search on the surrogate"

    def __post_init__(self) -> None:
        if self.method not in SEARCHES:
            raise ValueError(f"unknown search {self.method!r}; expected one of {SEARCHES}")
        self.surrogate: Surrogate = load_surrogate(self.model_id)

    def plan(
        self, budget_bytes: int, batch: int, seq: int, prefill_tokens: int | None = None
    ) -> KeepMask:
        """The mask the search finds whose bytes at (batch, seq) fit, or `BudgetError`."""
        table = byte_table(self.config, batch, seq, self.dtype, True, prefill_tokens)
        sizes = np.array([*table.attn, *table.mlp], dtype=np.float64)
        need = float(table.dense() - budget_bytes)  # bytes the drops must free
        most = max_drops(len(sizes), self.min_kept_fraction)
        reachable = float(np.sort(sizes)[::-1][:most].sum())
        if need > reachable:
            raise BudgetError(
                f"budget {budget_bytes:,} B is below every mask keeping at least "
                f"{self.min_kept_fraction:.0%} of blocks at batch {batch} × {seq} tokens",
                expected=f"a budget of at least {table.dense() - reachable:,.0f} B",
            )
        search = {"surrogate-greedy": self._greedy, "surrogate-beam": self._beam}
        if need <= 0:  # the dense model fits: nothing is dropped (the beam would drop one)
            dropped = np.zeros(len(sizes))
        else:
            dropped = search.get(self.method, self._milp)(sizes, need, most)
        if float(dropped @ sizes) < need:
            raise BudgetError(
                f"{self.method} reached {int(dropped.sum())} drops (the floor's most) without "
                f"fitting {budget_bytes:,} B at batch {batch} × {seq} tokens",
                expected="a larger budget, or surrogate-milp (exact)",
            )
        self.decisions += 1
        kept = [float(1 - x) for x in dropped]
        mask = KeepMask.from_vector(self.model_id, kept)
        return mask.model_copy(update={"source": "controller:search"})

    def quality_cost(self, mask: KeepMask) -> float | None:
        return predicted_delta_lnppl(self.model_id, mask.key)

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "SurrogateSearch",
            "planner": self.method,
            "origin": self.origin,
            "decisions": self.decisions,
            "fallbacks": 0,  # a search never falls back: it fits or raises BudgetError
            "fallback_rate": 0.0,
            "last_fallback": "",
        }

    # -- searches ---------------------------------------------------------------------------
    def _delta(self, drops: np.ndarray) -> np.ndarray:
        """Δ̂ of each row of `drops` ([n, 2L])."""
        g = features(drops) @ np.asarray(self.surrogate.coef)
        return np.expm1(np.maximum(g, 0.0))

    def _children(self, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Every drop set one block larger than `d`, and the block each adds."""
        free = np.flatnonzero(d == 0)
        kids = np.repeat(d[None, :], len(free), axis=0)
        kids[np.arange(len(free)), free] = 1.0
        return kids, free

    def _greedy(self, sizes: np.ndarray, need: float, most: int) -> np.ndarray:
        d = np.zeros(len(sizes))
        freed, now = 0.0, 0.0
        while freed < need and d.sum() < most:
            kids, free = self._children(d)
            useful = np.minimum(sizes[free], need - freed)
            j = int(np.argmin((self._delta(kids) - now) / useful))
            d, freed = kids[j], freed + sizes[free[j]]
            now = float(self._delta(d[None, :])[0])
        return d

    def _beam(self, sizes: np.ndarray, need: float, most: int) -> np.ndarray:
        frontier, best, best_cost = [np.zeros(len(sizes))], None, np.inf
        for _depth in range(most):
            kids = np.unique(np.concatenate([self._children(d)[0] for d in frontier]), axis=0)
            cost, freed = self._delta(kids), kids @ sizes
            fit = freed >= need
            if fit.any() and cost[fit].min() < best_cost:
                i = np.flatnonzero(fit)[np.argmin(cost[fit])]
                best, best_cost = kids[i], float(cost[i])
            open_ = np.flatnonzero(~fit)
            if len(open_) == 0:
                break
            rank = np.argsort(cost[open_] / freed[open_])[: self.width]
            frontier = [kids[open_[r]] for r in rank]
        if best is None:
            return self._greedy(sizes, need, most)
        return best

    def _milp(self, sizes: np.ndarray, need: float, most: int) -> np.ndarray:
        from rap.planning.search_milp import solve  # lazy: heavy (scipy)

        return solve(np.asarray(self.surrogate.coef), sizes, need, most)
