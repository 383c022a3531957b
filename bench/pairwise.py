"""Any two methods of a measured comparison against each other, and the winner it implies.

Usage:
    .venv/bin/python bench/pairwise.py [RESULT.json] [--against surrogate-greedy]

`bench/compare_policies.py --measure` stores every method's mask per situation and, on the test
split, the NLL of every mask per document. Its report puts `rap` against each method; this puts
every method against `--against` (default: the controller's default search,
`rap.planning.choice.DEFAULT_MODEL_SEARCH`) with the same interval (`doc_text.bootstrap_pairs`:
documents resampled per domain, situations by cluster of equal mask pairs), and names the winner
by issue 18's rule: the method with the lowest mean Δ ln ppl, unless no interval separates it
from a cheaper one (p50 planning time), in which case the cheapest of those.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def against(doc: dict[str, Any], a: str, b: str) -> dict[str, Any]:
    """mean Δ ln ppl of `a` − `b` over the situations, its 95 % interval, and equal masks."""
    from rap.importance.doc_text import bootstrap_pairs

    pairs = [(s[a], s[b]) for s in doc["per_situation"] if s.get(a) is not None and s.get(b)]
    pairs = [(x, y) for x, y in pairs if x is not None and y is not None]
    out = bootstrap_pairs(doc["nll_per_document"], pairs)
    out["same_mask"] = sum(x == y for x, y in pairs)
    out["n"] = len(pairs)
    return out


def winner(doc: dict[str, Any]) -> tuple[str, dict[str, dict[str, Any]]]:
    """The winner (module doc) and each tied method's interval against the best mean."""
    groups = {m: g for m, g in doc["groups"]["all"].items() if g["violations"] == 0}
    best = min(groups, key=lambda m: groups[m]["dlnppl"])
    ties = {m: against(doc, best, m) for m in groups if m != best}
    tied = [m for m, r in ties.items() if r["ci95"][0] <= 0.0 <= r["ci95"][1]]
    cheapest = min([best, *tied], key=lambda m: groups[m]["p50_ms"])
    return cheapest, {m: ties[m] for m in tied}


def main() -> None:
    from rap.planning.choice import DEFAULT_MODEL_SEARCH

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("result", nargs="?", default=str(ROOT / "bench/results/compare_test.json"))
    parser.add_argument("--against", default=DEFAULT_MODEL_SEARCH)
    args = parser.parse_args()
    doc = json.loads(Path(args.result).read_text())
    if "nll_per_document" not in doc:
        raise SystemExit(
            f"{args.result} has no per-document NLL (a --measure run on the test split)"
        )
    groups = doc["groups"]["all"]
    print(f"{'method':<22} {'Δ ln ppl':>9} {'p50 ms':>8}   method − {args.against} [95 % CI]  same")
    for m, g in groups.items():
        line = f"{m:<22} {g['dlnppl']:9.4f} {g['p50_ms']:8.2f}"
        if m != args.against:
            r = against(doc, m, args.against)
            lo, hi = r["ci95"]
            line += f"   {r['mean_diff']:+.4f} [{lo:+.4f}, {hi:+.4f}]  {r['same_mask']}/{r['n']}"
        print(line)
    name, tied = winner(doc)
    print(f"winner: {name} (ties with the best mean: {', '.join(tied) or 'none'})")


if __name__ == "__main__":
    main()
