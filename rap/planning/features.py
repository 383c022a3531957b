"""What the RAP agent observes and may do: observations and action masks for one model.

Shared by the env that trains the agent (`rap.agent.env`, whose docstring defines the spaces)
and the policy that serves it (`rap.planning.policy.RapPolicy`), so the two never disagree.
Blocks are numbered j = 0..2L−1: attention of layer j for j < L, MLP of layer j − L otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from rap.core import memory
from rap.core.byte_table import byte_table
from rap.core.errors import RapError
from rap.core.masks import max_drops
from rap.core.scores import find_scores

STOP = 0
"""Action 0: stop removing blocks."""
OBS_MAX = 4.0
"""Observations are clipped to [0, OBS_MAX]."""


def importance_ranks(scores: Sequence[float] | np.ndarray) -> np.ndarray:
    """rank_j / (N − 1): 0 for the least important block, 1 for the most (ties by index)."""
    order = np.argsort(np.asarray(scores, dtype=np.float64), kind="stable")
    ranks = np.empty(len(order))
    ranks[order] = np.arange(len(order))
    return ranks / max(len(order) - 1, 1)


def stored_importance(model_id: str, kind: str) -> np.ndarray:
    """Stored scores of `kind` for `model_id` in block order (attn 0..L−1, mlp 0..L−1)."""
    s = find_scores(model_id, kind)
    return np.array([*s.attn, *s.mlp], dtype=np.float64)


class Observer:
    """Builds observations and action masks for one model (shared by env and policy)."""

    def __init__(
        self, config: Any, dtype: Any, importance: Sequence[float] | np.ndarray, floor: float
    ) -> None:
        self.config, self.dtype = config, dtype
        self.n = 2 * len(memory.dense_mask(config).attn)
        if len(importance) != self.n:
            raise RapError(f"{len(importance)} importance scores", expected=f"{self.n} (2L)")
        self.ranks = importance_ranks(importance).astype(np.float32)
        self.max_drops = max_drops(self.n, floor)
        self.dim = 6 + 3 * self.n

    def table(self, batch: int, seq: int, prefill: int | None) -> tuple[int, np.ndarray]:
        """(base bytes, bytes_j per block) at (B, S, P)."""
        t = byte_table(self.config, batch, seq, self.dtype, True, prefill)
        return t.base, np.array([*t.attn, *t.mlp], dtype=np.float64)

    def observe(
        self, batch: int, seq: int, budget: int, base: int, sizes: np.ndarray, kept: np.ndarray
    ) -> dict[str, np.ndarray]:
        """The observation dict of the module doc (float32, clipped to [0, OBS_MAX])."""
        dense = base + float(sizes.sum())
        peak = base + float(sizes @ kept)
        deficit = max(peak - budget, 0.0)
        head = [
            math.log2(batch) / 6,
            math.log2(seq) / 12,
            budget / dense,
            peak / dense,
            5 * deficit / dense,
            base / dense,
        ]
        ratio = np.minimum(sizes / max(deficit, 1.0), 2.0) * kept if deficit > 0 else 0 * kept
        obs = np.concatenate([head, self.ranks, kept, ratio]).astype(np.float32)
        mask = self.action_mask(kept, sizes, deficit)
        return {"action_mask": mask, "observations": np.clip(obs, 0, OBS_MAX)}

    def action_mask(self, kept: np.ndarray, sizes: np.ndarray, deficit: float) -> np.ndarray:
        """The module doc's valid actions: STOP, and kept blocks while the floor allows a drop;
        over budget, only the drops that can still reach it, where any can."""
        mask = np.zeros(1 + self.n, dtype=np.float32)
        mask[STOP] = 1.0
        left = self.max_drops - int(self.n - kept.sum())
        if left <= 0:
            return mask
        mask[1:] = kept
        if deficit > 0:
            reach = self.reachable(kept, sizes, left) >= deficit
            if reach.any():
                mask[1:] = reach
        return mask

    @staticmethod
    def reachable(kept: np.ndarray, sizes: np.ndarray, left: int) -> np.ndarray:
        """Per block j: the most bytes that dropping j and then `left − 1` other kept blocks can
        free (0 for blocks already dropped)."""
        held = sizes * kept
        order = np.argsort(-held, kind="stable")
        top = np.concatenate([[0.0], np.cumsum(held[order])])
        rank = np.empty(len(held), dtype=np.int64)
        rank[order] = np.arange(len(held))
        k = min(left, len(held))
        # j among the k − 1 largest: those k − 1 plus the k-th; else j plus the k − 1 largest.
        best = np.where(rank < k - 1, top[k], held + top[k - 1])
        return best * kept
