"""Fitting the perplexity surrogate (`rap.planning.surrogate`) to measured masks, and its report.

`python -m rap.agent.surrogate_fit` fits on the measured table (`rap.importance.quality`),
prints the held-out report and writes the shipped surrogate; `--check KEYS` only reports the
shipped surrogate's error on the measured masks listed in KEYS (e.g. those a trained policy
chose: the DAgger step of `scripts/train_policy.sh`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from rap.core.errors import RapError
from rap.core.loading import DEFAULT_MODEL_ID
from rap.core.masks import blocks_of
from rap.importance.quality import load_table, read_keys
from rap.planning.surrogate import (
    CAP,
    RELEVANT,
    Surrogate,
    drop_vector,
    features,
    load_surrogate,
    surrogate_path,
)


def fit(
    keys: Sequence[str], lnppl: Sequence[float], dense: float, num_layers: int, lam: float
) -> Surrogate:
    """Ridge regression of ln(1 + Δ) on features (module doc), shrunk toward the additive model
    of the single drops in `keys` rather than toward zero: c = c₀ + (XᵀX + λI)⁻¹ Xᵀ(y − X c₀),
    c₀_j = ln(1 + Δ of dropping block j alone). Shrinking toward zero priced MLP 0 (alone:
    +9.7 nats; every other mask with it is beyond CAP, so it is seen once) at +0.8 nats."""
    x = features(np.stack([drop_vector(k, num_layers) for k in keys]))
    y = np.log1p(np.maximum(np.asarray(lnppl) - dense, 0.0))
    prior = np.zeros(x.shape[1])
    for k, target in zip(keys, y, strict=True):
        if k and "," not in k:
            prior[int(np.argmax(drop_vector(k, num_layers)))] = target
    rhs = x.T @ (y - x @ prior)
    coef = prior + np.linalg.solve(x.T @ x + lam * np.eye(x.shape[1]), rhs)
    return Surrogate(num_layers, dense, tuple(float(c) for c in coef), {"lambda": lam})


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Rank correlation: Pearson correlation of the ranks (ties broken by order)."""
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def evaluate(model: Surrogate, keys: Sequence[str], lnppl: Sequence[float]) -> dict[str, float]:
    """Spearman ρ, mean |error| and mean error (bias) in ln perplexity on `keys`."""
    pred, true = model.predict(keys), np.asarray(lnppl)
    return {
        "spearman": spearman(pred, true),
        "mae_lnppl": float(np.abs(pred - true).mean()),
        "bias_lnppl": float((pred - true).mean()),
        "masks": len(keys),
    }


def split(keys: Sequence[str], held_out: float, seed: int) -> tuple[list[str], list[str]]:
    """Single drops always train (they pin each block's cost); other masks split at random."""
    rng = np.random.default_rng(seed)
    multi = [k for k in keys if "," in k]
    test = set(rng.choice(multi, size=int(held_out * len(multi)), replace=False).tolist())
    return [k for k in keys if k not in test], sorted(test)


def _fit_on(
    keys: Sequence[str], table: dict[str, float], dense: float, n_l: int, lam: float
) -> Surrogate:
    """fit() on `keys` without the multi-block masks beyond CAP (module doc)."""
    use = [k for k in keys if "," not in k or table[k] - dense <= CAP]
    return fit(use, [table[k] for k in use], dense, n_l, lam)


def _report(
    model: Surrogate, keys: Sequence[str], table: dict[str, float], dense: float
) -> dict[str, dict[str, float]]:
    near = [k for k in keys if table[k] - dense <= RELEVANT]
    return {
        "all": evaluate(model, keys, [table[k] for k in keys]),
        f"delta<={RELEVANT}": evaluate(model, near, [table[k] for k in near]),
    }


MIN_MULTI = 40
"""Fewest multi-block masks a fit needs: its validation and held-out splits take a quarter each,
and the pairwise and position terms have nothing to fit without them."""


def _check_table(table: dict[str, float], model_id: str) -> int:
    """The number of layers, once the table holds the dense model, every single drop and
    MIN_MULTI multi-block masks; else one `RapError` saying what it holds and how to fix it."""
    layers = [layer for k in table for _, layer in blocks_of(k)]
    n_l = 1 + max(layers) if layers else 0
    singles = sum(1 for k in table if k and "," not in k)
    multi = sum(1 for k in table if "," in k)
    if "" not in table or n_l == 0 or singles < 2 * n_l or multi < MIN_MULTI:
        raise RapError(
            f"the fit table of {model_id} holds {len(table)} masks (dense: "
            f"{'yes' if '' in table else 'no'}, single drops: {singles} of {2 * n_l}, "
            f"multi-block: {multi}): too few to fit a surrogate",
            expected=f"the dense model, every single drop and at least {MIN_MULTI} multi-block "
            "masks",
            fix="python -m rap.importance.quality measure --part fit, then "
            "python -m rap.importance.quality export --part fit (it merges with the shipped table)",
        )
    return n_l


def fit_and_report(
    model_id: str = DEFAULT_MODEL_ID,
    held_out: float = 0.25,
    seed: int = 0,
    lams: Sequence[float] = (0.03, 0.1, 0.3, 1.0, 3.0),
) -> tuple[Surrogate, dict]:
    """Choose λ on repeated validation splits of the training masks, report on held-out masks
    never fitted, then refit on every mask (the shipped surrogate); the report says all of it."""
    table = load_table(model_id, "fit")
    n_l = _check_table(table, model_id)
    dense = table.pop("")
    keys = sorted(table)
    train, test = split(keys, held_out, seed)
    err = dict.fromkeys(lams, 0.0)
    for rep in range(1, 5):  # repeated validation splits: one split picks λ by noise
        inner, valid = split(train, 0.25, seed + rep)
        for lam in lams:
            fitted = _fit_on(inner, table, dense, n_l, lam)
            err[lam] += evaluate(fitted, valid, [table[k] for k in valid])["mae_lnppl"]
    lam = min(err, key=lambda x: err[x])
    held = _report(_fit_on(train, table, dense, n_l, lam), test, table, dense)
    final = _fit_on(keys, table, dense, n_l, lam)
    report = {
        "lambda": lam,
        "cap": CAP,
        "held_out": held,
        "train_masks": len(train),
        "all_masks": len(keys),
        "in_sample": _report(final, keys, table, dense),
    }
    return Surrogate(n_l, dense, final.coef, {"lambda": lam, "report": report}), report


def check(model_id: str, keys_file: str | Path) -> dict[str, dict[str, float]]:
    """The shipped surrogate's error on measured masks listed in `keys_file` (e.g. the masks a
    trained policy chose), over all of them and over those with Δ ≤ RELEVANT: a negative bias
    means the agent found masks the surrogate flatters."""
    table = load_table(model_id, "fit")
    keys = read_keys(keys_file)
    missing = [k for k in keys if k not in table]
    if missing:
        fix = f"python -m rap.importance.quality measure --part fit --keys {keys_file}"
        what = f"{len(missing)} of {len(keys)} masks in {keys_file} are not measured"
        raise RapError(what, fix=fix)
    return _report(load_surrogate(model_id), keys, table, table[""])


def main(argv: Sequence[str] | None = None) -> int:
    """Fit on the measured table, print the held-out report, write the shipped surrogate; with
    --check KEYS only report the shipped surrogate's error on those measured masks."""

    parser = argparse.ArgumentParser(
        prog="python -m rap.agent.surrogate_fit", description=main.__doc__
    )
    parser.add_argument("model", nargs="?", default=DEFAULT_MODEL_ID)
    parser.add_argument("--check", metavar="KEYS", help="a file of mask keys, one a line")
    args = parser.parse_args(argv)
    try:
        if args.check:
            print(json.dumps(check(args.model, args.check)))
            return 0
        model, report = fit_and_report(args.model)
    except RapError as exc:
        print(f"python -m rap.agent.surrogate_fit: error: {exc}", file=sys.stderr)
        return 2
    surrogate_path(args.model).write_text(model.to_json())
    load_surrogate.cache_clear()
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
