"""Paired bootstrap intervals for the difference in ln perplexity between two masks measured
on the same windows.

For masks a and b on one domain's n windows of L tokens (NLL per window, nats):

    diff = Σ_i (a_i − b_i) / (n · (L − 1))         (ln ppl(a) − ln ppl(b))

Each draw resamples the n window indices with replacement and applies the same indices to both
masks, so the window-to-window variation they share cancels; the 95 % interval is the 2.5th and
97.5th percentile of the draws. Over several domains, each draw resamples every domain's windows
independently and averages the domains' differences (each domain weighs the same).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from rap.core.errors import RapError


@dataclass(frozen=True)
class Interval:
    diff: float
    low: float
    high: float

    def as_list(self) -> list[float]:
        return [round(self.diff, 4), round(self.low, 4), round(self.high, 4)]


def _per_window(a: Sequence[float], b: Sequence[float], window: int) -> np.ndarray:
    if len(a) != len(b) or not a:
        raise RapError(
            f"paired windows differ in number ({len(a)} and {len(b)})",
            expected="both masks measured on the same, non-empty windows",
        )
    return (np.asarray(a, dtype=float) - np.asarray(b, dtype=float)) / (window - 1)


def paired_interval(
    a: Mapping[str, Sequence[float]],
    b: Mapping[str, Sequence[float]],
    window: int,
    draws: int = 2000,
    seed: int = 0,
) -> Interval:
    """ln ppl(a) − ln ppl(b), averaged over the domains both hold, with its 95 % interval.
    `a[domain]`, `b[domain]`: NLL per window, the same windows in the same order."""
    domains = [d for d in a if d in b]
    if not domains:
        raise RapError("the two masks share no domain", expected="measurements on one domain")
    diffs = [_per_window(a[d], b[d], window) for d in domains]
    point = float(np.mean([x.mean() for x in diffs]))
    rng = np.random.default_rng(seed)
    stats = np.zeros(draws)
    for x in diffs:
        idx = rng.integers(0, len(x), (draws, len(x)))
        stats += x[idx].mean(axis=1)
    stats /= len(diffs)
    return Interval(point, float(np.percentile(stats, 2.5)), float(np.percentile(stats, 97.5)))
