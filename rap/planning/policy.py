"""`RapPolicy`: the trained RAP agent at serving time, a `MaskPlanner`.

The exported network of `rap train` (`rap.planning.policy_net`, numpy, no RLlib, no env
runners) runs greedily through the env's own observation and action-mask loop
(`rap.planning.features.Observer`), from the dense mask, one removal at a time, until the mask
fits:

    m_0 = dense;  a_t = argmax_{a : mask_t(a) = 1} net(obs(m_t))_a;  m_{t+1} = m_t − block(a_t)

The env's action mask offers only drops after which the budget can still be met within the
quality floor (`Observer.action_mask`); at serving time STOP is also withheld while over
budget, since a mask over budget cannot be served (in training STOP stays valid and costs the
penalty). So from any budget some allowed mask meets, the agent's own rollout ends fitting. It
never returns a mask over budget: if the agent still ends over budget, the decision falls back to
mem-greedy (`HeuristicPolicy`), logs why, and counts it (`fallbacks`, `last_fallback`). A
budget that no allowed mask meets raises `BudgetError` from the fallback planner and is not
counted as the agent's failure.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rap.core.constants import DATA_DIR
from rap.core.errors import RapError
from rap.core.masks import KeepMask
from rap.planning.features import Observer, stored_importance
from rap.planning.heuristic import HeuristicPolicy
from rap.planning.policy_net import META_FILE, PolicyNet
from rap.planning.surrogate import predicted_delta_lnppl

log = logging.getLogger("rap.planning.policy")
DEFAULT_POLICY_DIR = DATA_DIR / "policy"


def _policy_folder(path: str | Path | None) -> Path:
    """The exported policy folder: `path` itself, its `policy/` (a `rap train --out` folder),
    the parent of an RLModule `module/` folder, or the packaged default for None/"default"."""
    if path is None or str(path) == "default":
        return DEFAULT_POLICY_DIR
    p = Path(path)
    for candidate in (p, p / "policy", p.parent):
        if (candidate / META_FILE).is_file():
            return candidate
    raise RapError(
        f"{p} holds no exported RAP policy",
        expected=f"a folder with {META_FILE} (the `policy/` folder that `rap train` writes)",
    )


@dataclass
class RapPolicy:
    """The trained agent, inference only, with a counted mem-greedy fallback (module doc)."""

    net: Any
    config: Any
    model_id: str
    dtype: Any
    min_kept_fraction: float = 0.0
    decisions: int = 0
    fallbacks: int = 0
    last_fallback: str = ""
    origin: str = "exported policy"
    observer: Any = field(init=False)
    fallback: HeuristicPolicy = field(init=False)

    def __post_init__(self) -> None:
        trained_for = self.net.meta.get("model")
        if trained_for != self.model_id:
            raise RapError(
                f"the policy was trained for {trained_for!r}",
                expected=f"a policy for {self.model_id!r}",
                fix="train one with `rap train` or use --method mem-greedy",
            )
        # The scores the policy was trained with (its observations), else the stored ones:
        # scores recomputed later would shift the observation under a trained network.
        importance = self.net.meta.get("importance") or stored_importance(
            self.model_id, self.net.meta.get("scores", "bi")
        )
        self.observer = Observer(self.config, self.dtype, importance, self.min_kept_fraction)
        if (self.net.obs_dim, self.net.num_actions) != (self.observer.dim, self.observer.n + 1):
            raise RapError(
                f"the policy network takes {self.net.obs_dim} features and {self.net.num_actions}"
                " actions",
                expected=f"{self.observer.dim} and {self.observer.n + 1} for this model",
            )
        self.fallback = HeuristicPolicy(
            self.config, self.model_id, self.dtype, "mem-greedy", self.min_kept_fraction
        )

    @classmethod
    def load(
        cls,
        path: str | Path | None,
        config: Any,
        model_id: str,
        dtype: Any,
        min_kept_fraction: float = 0.0,
    ) -> RapPolicy:
        """Load an exported policy folder (`rap train`'s `out/policy/`; None: the default)."""
        folder = _policy_folder(path)
        net = PolicyNet.load(folder)
        # Not "default": `policy: default` runs a search for the default model, not this policy.
        origin = "shipped with the package," if folder == DEFAULT_POLICY_DIR else "exported policy"
        return cls(net, config, model_id, dtype, min_kept_fraction, origin=f"{origin} {folder}")

    def choose(
        self, budget_bytes: int, batch: int, seq: int, prefill_tokens: int | None = None
    ) -> tuple[np.ndarray, bool]:
        """The agent's own rollout: (kept vector over the 2L blocks, whether it fits)."""
        base, sizes = self.observer.table(batch, seq, prefill_tokens)
        kept = np.ones(self.observer.n, dtype=np.float32)
        peak = base + float(sizes.sum())
        while peak > budget_bytes:
            obs = self.observer.observe(batch, seq, budget_bytes, base, sizes, kept)
            valid = obs["action_mask"]
            if valid[1:].any():  # over budget with a drop that can still fit: no STOP here
                valid = valid.copy()
                valid[0] = 0.0
            a = self.net.act(obs["observations"], valid)
            if a == 0:
                break
            kept[a - 1] = 0.0
            peak -= float(sizes[a - 1])
        return kept, peak <= budget_bytes

    def plan(
        self, budget_bytes: int, batch: int, seq: int, prefill_tokens: int | None = None
    ) -> KeepMask:
        """A mask whose predicted peak at (batch, seq) fits `budget_bytes` (`MaskPlanner`):
        `controller:rap`, or `controller:rap-fallback` where mem-greedy planned instead."""
        mask, fell_back = self._decide(budget_bytes, batch, seq, prefill_tokens)
        source = "controller:rap-fallback" if fell_back else "controller:rap"
        return mask.model_copy(update={"source": source})

    def _decide(
        self, budget_bytes: int, batch: int, seq: int, prefill_tokens: int | None
    ) -> tuple[KeepMask, bool]:
        """(the mask, whether mem-greedy made it instead of the agent)."""
        base, sizes = self.observer.table(batch, seq, prefill_tokens)
        n = self.observer.n
        if base + float(sizes.sum()) <= budget_bytes:  # nothing to decide
            return KeepMask.dense(self.model_id, n // 2), False
        smallest = base + float(np.sort(sizes)[: n - self.observer.max_drops].sum())
        if smallest > budget_bytes:  # no allowed mask fits: the planner says so, uncounted
            return self.fallback.plan(budget_bytes, batch, seq, prefill_tokens), True
        self.decisions += 1
        kept, fits = self.choose(budget_bytes, batch, seq, prefill_tokens)
        if not fits:
            self.fallbacks += 1
            self.last_fallback = (
                f"agent stopped over budget at batch {batch} × {seq} tokens, budget "
                f"{budget_bytes:,} B: mem-greedy planned instead"
            )
            log.warning(
                "%s (%d of %d decisions)", self.last_fallback, self.fallbacks, self.decisions
            )
            return self.fallback.plan(budget_bytes, batch, seq, prefill_tokens), True
        return KeepMask.from_vector(self.model_id, kept.tolist()), False

    def quality_cost(self, mask: KeepMask) -> float | None:
        """Predicted Δ ln perplexity of `mask` from the shipped surrogate (None without one)."""
        return predicted_delta_lnppl(self.model_id, mask.key)

    def describe(self) -> dict[str, Any]:
        """What operators see (`/admin/state`, logs, `rap serve`)."""
        return {
            "kind": "RapPolicy",
            "planner": "rap",
            "origin": self.origin,
            "algo": self.net.meta.get("algo"),
            "decisions": self.decisions,
            "fallbacks": self.fallbacks,
            "fallback_rate": round(self.fallback_rate, 4),
            "last_fallback": self.last_fallback,
        }

    @property
    def fallback_rate(self) -> float:
        return self.fallbacks / self.decisions if self.decisions else 0.0
