"""Every planner's masks on the default model, through `rap plan --json`: a snapshot to compare
before and after a change that must not change plans (a refactoring).

Usage: .venv/bin/python scripts/plans_snapshot.py --out before.json
       .venv/bin/python scripts/plans_snapshot.py --compare before.json   (exit 1 on any change)
       .venv/bin/python scripts/plans_snapshot.py --compare before.json --out after.json

Grid: every stored-score planner, `rap` (the shipped policy) and the searches on the surrogate
(`surrogate-greedy`, what `policy: default` serves; `surrogate-beam`; `surrogate-milp`) × budget
fractions 0.8 and 0.5 × workloads 1 × 256 and 8 × 2,048 tokens × dtypes float16 and float32 ×
quality floors 0 and 0.5 (176 plans, one `rap plan` process each: about 13 minutes on two busy
CPU cores). The oracle is left out (it runs the model; minutes per plan). A budget a planner
cannot meet records its error line. `--compare` checks the entries of the older snapshot only,
so a grid that gained planners compares what both have.

The snapshot of the default model's plans today: bench/results/plans_snapshot.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
from pathlib import Path

METHODS = (
    *("gsi", "oneshot", "mem-greedy", "shortgpt", "attn-drop", "mlp-drop", "random", "rap"),
    *("surrogate-greedy", "surrogate-beam", "surrogate-milp"),
)
FRACTIONS = (0.8, 0.5)
SHAPES = ((1, 256), (8, 2048))
DTYPES = ("float16", "float32")
FLOORS = (0.0, 0.5)


def plan(method: str, frac: float, batch: int, seq: int, dtype: str, floor: float) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "rap.cli",
        "plan",
        "--method",
        method,
        "--budget-frac",
        str(frac),
        "--batch",
        str(batch),
        "--seq",
        str(seq),
        "--dtype",
        dtype,
        "--min-kept-fraction",
        str(floor),
        "--json",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1]}
    out = json.loads(proc.stdout)
    return {"attn": out["attn"], "mlp": out["mlp"]}


def snapshot() -> dict[str, dict]:
    grid = list(itertools.product(METHODS, FRACTIONS, SHAPES, DTYPES, FLOORS))
    rows = {}
    for i, (m, f, (b, s), d, fl) in enumerate(grid, 1):
        rows[f"{m} {f} {b}x{s} {d} floor{fl}"] = plan(m, f, b, s, d, fl)
        print(f"\r{i}/{len(grid)}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the snapshot here")
    parser.add_argument("--compare", type=Path, help="compare with this older snapshot")
    args = parser.parse_args()
    if not args.out and not args.compare:
        parser.error("name --out, --compare or both")
    now = snapshot()
    if args.out:
        args.out.write_text(json.dumps(now, indent=0) + "\n")
        print(f"{len(now)} plans written to {args.out}")
    if not args.compare:
        return 0
    before = json.loads(args.compare.read_text())
    changed = [k for k in before if before[k] != now.get(k)]
    print(f"{len(before)} plans compared, {len(changed)} changed")
    for k in changed:
        print(f"  {k}: {before[k]} → {now.get(k)}")
    return 1 if changed else 0


if __name__ == "__main__":
    sys.exit(main())
