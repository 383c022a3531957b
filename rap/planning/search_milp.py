"""The exact minimum of the perplexity surrogate under a byte budget, as a mixed-integer linear
program (`rap.planning.search`, `surrogate-milp`).

With d ∈ {0,1}^{2L} (attention blocks a, then MLP blocks m) the surrogate's exponent is

    g(d) = v·d + (θ₀ n_a² + θ₁ n_m² + θ₂ n_a n_m + θ₃ Σ a_l a_{l+1} + θ₄ Σ m_l m_{l+1}
                  + θ₅ Σ a_l m_l + θ₆ Σ depth_l (a_l + m_l)) / 10

(`rap.planning.surrogate.features`; the depth term is linear: mean depth × count). Linearised:
the counts as one joint one-hot y_{k,q} over (k attention, q MLP blocks dropped), k + q ≤ the
floor's most drops, so n_a², n_m², n_a n_m are linear in y; each pair product p = x·z by
p ≤ x, p ≤ z, p ≥ x + z − 1 (exact for binary x, z whatever the sign of its coefficient).
Bytes in MiB keep the constraint matrix well scaled.
"""

from __future__ import annotations

import numpy as np

from rap.core.constants import MIB
from rap.core.errors import RapError

TIME_LIMIT_S = 30.0


def solve(coef: np.ndarray, sizes: np.ndarray, need: float, most: int) -> np.ndarray:
    """The drop vector minimising g subject to Σ sizes·d ≥ need and Σ d ≤ most."""
    from scipy.optimize import Bounds, LinearConstraint, milp  # lazy: heavy (scipy)

    n2 = len(sizes)
    n = n2 // 2
    v, th = coef[:n2], coef[n2:] / 10.0
    depth = np.arange(n) / max(n - 1, 1)
    pairs = [(k, q) for k in range(n + 1) for q in range(n + 1) if k + q <= most]
    products = (
        [(i, i + 1) for i in range(n - 1)]  # adjacent attention
        + [(n + i, n + i + 1) for i in range(n - 1)]  # adjacent MLP
        + [(i, n + i) for i in range(n)]  # both blocks of a layer
    )
    prod_coef = [th[3]] * (n - 1) + [th[4]] * (n - 1) + [th[5]] * n
    ny, npr = len(pairs), len(products)
    y0, p0 = n2, n2 + ny
    c = np.zeros(n2 + ny + npr)
    c[:n2] = v + th[6] * np.concatenate([depth, depth])
    c[y0:p0] = [th[0] * k * k + th[1] * q * q + th[2] * k * q for k, q in pairs]
    c[p0:] = prod_coef
    rows, lo, hi = [], [], []

    def row(entries: dict[int, float], low: float, high: float) -> None:
        r = np.zeros(len(c))
        for i, x in entries.items():
            r[i] = x
        rows.append(r)
        lo.append(low)
        hi.append(high)

    row({y0 + j: 1.0 for j in range(ny)}, 1.0, 1.0)
    row({**{i: 1.0 for i in range(n)}, **{y0 + j: -k for j, (k, _) in enumerate(pairs)}}, 0, 0)
    row({**{n + i: 1.0 for i in range(n)}, **{y0 + j: -q for j, (_, q) in enumerate(pairs)}}, 0, 0)
    row({i: sizes[i] / MIB for i in range(n2)}, need / MIB, np.inf)
    for j, (x, z) in enumerate(products):
        row({p0 + j: 1.0, x: -1.0}, -np.inf, 0.0)
        row({p0 + j: 1.0, z: -1.0}, -np.inf, 0.0)
        row({p0 + j: 1.0, x: -1.0, z: -1.0}, -1.0, np.inf)
    integrality = np.concatenate([np.ones(n2 + ny), np.zeros(npr)])
    res = milp(
        c,
        constraints=LinearConstraint(np.array(rows), lo, hi),
        integrality=integrality,
        bounds=Bounds(0.0, 1.0),
        options={"time_limit": TIME_LIMIT_S},
    )
    if res.status != 0 or res.x is None:
        raise RapError(
            f"the surrogate MILP ended without a proven optimum: {res.message}",
            expected=f"HiGHS to prove optimality within {TIME_LIMIT_S:.0f} s",
        )
    return np.round(res.x[:n2])
