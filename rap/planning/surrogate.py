"""A surrogate of the real model's perplexity under a mask, fitted to measurements
(`rap.importance.quality`).

With d ∈ {0,1}^{2L} the dropped blocks (attention 0..L−1, then MLP 0..L−1), the surrogate
predicts the rise in ln perplexity over the dense model, Δ(d) = lnppl(d) − lnppl(dense) ≥ 0:

    u(d)   = Σ_j w_j d_j                                  (one cost per block, w_j ≥ 0)
    φ(d)   = [n_a², n_m², n_a·n_m, adj_a, adj_m, same, late·n]
    Δ̂(d)  = exp(g(d)) − 1,   g(d) = ln(1 + u(d)) ... fitted as  ln(1 + Δ) ≈ Σ_j v_j d_j + θ·φ(d)

n_a, n_m: attention and MLP blocks dropped; adj_a, adj_m: pairs of adjacent layers whose
attention (MLP) blocks are both dropped; same: layers with both blocks dropped; late·n: the mean
depth of dropped blocks (l / L) times their number. The fit is ridge regression on
y = ln(1 + Δ) (perplexity grows multiplicatively, so errors are relative), with λ chosen on a
validation split; a mask predicts lnppl(dense) + Δ̂. Pairwise and position terms capture that
drops compound (14 drops cost ~1.6× the sum of their single-drop costs here). Multi-block masks
with Δ > CAP (perplexity × 55: broken models no planner should choose) are left out of the fit,
so that the coefficients serve the range where choices are made; every single drop is kept.

This module predicts; `rap.agent.surrogate_fit` fits it (`python -m rap.agent.surrogate_fit`)
and reports its error on held-out masks (Spearman rank correlation and mean absolute error of ln
perplexity, on masks never used to fit it; also in docs/results.md). The fitted coefficients
ship as `rap/data/<model>.surrogate.json`.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rap.core.constants import DATA_DIR
from rap.core.errors import RapError
from rap.core.loading import DEFAULT_MODEL_ID
from rap.core.masks import blocks_of

FORMAT = "rap-surrogate/1"
CAP = 4.0
RELEVANT = 2.5
"""Held-out errors are also reported on masks with Δ ≤ RELEVANT, where planners choose."""
EXTRA = ("n_attn^2", "n_mlp^2", "n_attn*n_mlp", "adj_attn", "adj_mlp", "same_layer", "depth*n")


def drop_vector(key: str, num_layers: int) -> np.ndarray:
    """d ∈ {0,1}^{2L} of a mask key (attention blocks first)."""
    d = np.zeros(2 * num_layers)
    for kind, layer in blocks_of(key):
        d[layer if kind == "attn" else num_layers + layer] = 1.0
    return d


def features(d: np.ndarray) -> np.ndarray:
    """[d, φ(d)] for one drop vector or a batch [n, 2L] (module doc)."""
    d = np.atleast_2d(d)
    n_l = d.shape[1] // 2
    a, m = d[:, :n_l], d[:, n_l:]
    na, nm = a.sum(1), m.sum(1)
    depth = np.arange(n_l) / max(n_l - 1, 1)
    late = (a @ depth + m @ depth) / np.maximum(na + nm, 1.0) * (na + nm)
    phi = np.stack(
        [
            na**2,
            nm**2,
            na * nm,
            (a[:, 1:] * a[:, :-1]).sum(1),
            (m[:, 1:] * m[:, :-1]).sum(1),
            (a * m).sum(1),
            late,
        ],
        axis=1,
    )
    return np.concatenate([d, phi / 10.0], axis=1)


@dataclass(frozen=True)
class Surrogate:
    """lnppl(d) = dense + exp(coef · features(d)) − 1 (module doc)."""

    num_layers: int
    dense_lnppl: float
    coef: tuple[float, ...]
    meta: dict[str, object]

    def lnppl(self, dropped: np.ndarray) -> float:
        """ln perplexity with the blocks marked in `dropped` (length 2L) removed."""
        g = float(features(np.asarray(dropped, dtype=np.float64))[0] @ self._coef)
        return self.dense_lnppl + float(np.expm1(max(g, 0.0)))

    def predict(self, keys: Sequence[str]) -> np.ndarray:
        x = features(np.stack([drop_vector(k, self.num_layers) for k in keys]))
        return self.dense_lnppl + np.expm1(np.maximum(x @ self._coef, 0.0))

    @functools.cached_property
    def _coef(self) -> np.ndarray:
        return np.asarray(self.coef)

    def to_json(self) -> str:
        doc = {
            "format": FORMAT,
            "num_layers": self.num_layers,
            "dense_lnppl": self.dense_lnppl,
            "features": "2L drop indicators (attn, mlp), then " + ", ".join(EXTRA),
            "coef": [round(c, 6) for c in self.coef],
            **self.meta,
        }
        return json.dumps(doc, indent=1) + "\n"


def surrogate_path(model_id: str) -> Path:
    return DATA_DIR / f"{model_id}.surrogate.json"


@functools.lru_cache(maxsize=4)
def load_surrogate(model_id: str = DEFAULT_MODEL_ID) -> Surrogate:
    """The shipped surrogate of `model_id` (cached in memory)."""
    p = surrogate_path(model_id)
    if not p.is_file():
        raise RapError(
            f"no perplexity surrogate ships for {model_id}",
            fix="measure masks (python -m rap.importance.quality measure) and run "
            "python -m rap.agent.surrogate_fit",
        )
    doc = json.loads(p.read_text())
    if doc.get("format") != FORMAT:
        raise RapError(f"{p} has format {doc.get('format')!r}", expected=FORMAT)
    meta = {
        k: v for k, v in doc.items() if k not in ("format", "num_layers", "dense_lnppl", "coef")
    }
    return Surrogate(doc["num_layers"], doc["dense_lnppl"], tuple(doc["coef"]), meta)


def predicted_delta_lnppl(model_id: str, mask_key: str) -> float | None:
    """The shipped surrogate's Δ ln perplexity of a mask (0 for the dense model), or None when
    no surrogate ships for `model_id` (an estimate: see the module doc for its error)."""
    try:
        surrogate = load_surrogate(model_id)
    except RapError:
        return None
    if not mask_key:
        return 0.0
    return float(surrogate.predict([mask_key])[0] - surrogate.dense_lnppl)
