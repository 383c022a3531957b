"""How stable is an importance order? Spearman's ρ between two score files of one model.

Usage: .venv/bin/python bench/score_stability.py A.json B.json

Typically A and B are the same method on the two halves of the calibration text, split by
document (`rap importance --half a|b`). Prints ρ between the blocks' removal ranks (the order a
planner follows: GSI's own order, else ascending score), between the raw scores, and, for
Block Influence, between the whole-layer scores; plus how many of the first 10 and 20 blocks
to go the two orders share.
"""

from __future__ import annotations

import argparse

from scipy.stats import spearmanr

from rap.core.scores import BlockScores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a")
    parser.add_argument("b")
    args = parser.parse_args()
    a, b = BlockScores.from_file(args.a), BlockScores.from_file(args.b)
    if (a.model, a.num_layers) != (b.model, b.num_layers):
        raise SystemExit("the two files score different models")
    order_a, order_b = a.removal_order(), b.removal_order()
    rank_b = {blk: i for i, blk in enumerate(order_b)}
    rho_rank = spearmanr(range(len(order_a)), [rank_b[blk] for blk in order_a]).statistic
    rho_score = spearmanr([*a.attn, *a.mlp], [*b.attn, *b.mlp]).statistic
    for name, s in (("A", a), ("B", b)):
        c = s.calibration
        text = f"{c.source}/{c.half or 'all'}, {c.tokens:,} tokens" if c else "weights"
        print(f"{name}: {s.method} on {text}")
    print(f"Spearman ρ of removal ranks: {rho_rank:.3f}")
    print(f"Spearman ρ of scores:        {rho_score:.3f}")
    if a.layers is not None and b.layers is not None:
        print(f"Spearman ρ of layer scores:  {spearmanr(a.layers, b.layers).statistic:.3f}")
    for k in (10, 20):
        shared = len(set(order_a[:k]) & set(order_b[:k]))
        print(f"first {k} blocks to go: {shared} in common")


if __name__ == "__main__":
    main()
