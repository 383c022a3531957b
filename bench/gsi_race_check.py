"""How reliable is GSI's screen-then-confirm race? A check on a one-shot scan's per-chunk NLL.

Usage: .venv/bin/python bench/gsi_race_check.py ONESHOT.json [--screen-chunks 1] [--finalists 3]

A one-shot scan is exactly GSI's first step with every candidate run on every chunk. Its JSON
keeps each candidate's NLL per calibration chunk (`details.chunk_nll`), so the race can be
replayed offline: rank candidates by their NLL on the first `screen-chunks` chunks, keep the
`finalists` best, and see whether the exhaustive winner is among them. Also printed: Spearman's
ρ between the screened and the full Δ over all candidates, and for each block where the
exhaustive top-10 sit in the screened ranking.
"""

from __future__ import annotations

import argparse

from scipy.stats import spearmanr

from rap.core.scores import BlockScores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("oneshot")
    parser.add_argument("--screen-chunks", type=int, default=1)
    parser.add_argument("--finalists", type=int, default=3)
    args = parser.parse_args()
    scores = BlockScores.from_file(args.oneshot)
    chunks: dict[str, list[float]] = scores.details["chunk_nll"]
    dense: list[float] = scores.details["dense_chunk_nll"]
    k = args.screen_chunks
    full = {b: sum(v) - sum(dense) for b, v in chunks.items()}
    screen = {b: sum(v[:k]) - sum(dense[:k]) for b, v in chunks.items()}
    by_full = sorted(full, key=full.__getitem__)
    by_screen = sorted(screen, key=screen.__getitem__)
    rank = {b: i for i, b in enumerate(by_screen)}
    rho = spearmanr([full[b] for b in by_full], [screen[b] for b in by_full]).statistic
    print(f"{len(full)} candidates, {len(dense)} chunks, screen on {k}")
    print(f"exhaustive winner {by_full[0]}: screened rank {rank[by_full[0]] + 1}")
    print(f"race keeps it with {args.finalists} finalists: {rank[by_full[0]] < args.finalists}")
    print(f"Spearman(screen Δ, full Δ) = {rho:.3f}")
    print(
        "exhaustive top 10 → screened rank: "
        + ", ".join(f"{b}→{rank[b] + 1}" for b in by_full[:10])
    )


if __name__ == "__main__":
    main()
