"""What the no-thrash rule costs in quality, against switching to every bucket's plan at once.

Usage: .venv/bin/python bench/mask_rules.py [--minutes 10] [--measure] [--out F.json]

A replica's load moves (requests come and go, the budget falls and returns); each step the
planner names the best mask for the budget and the running rows' bucket (the controller's
(batch, seq) grid). A row's mask is the intersection of every mask it ran under (invariant 1),
so how the replica moves between plans decides what each row is served under:

- `per-bucket`: every step runs its bucket's plan (unconstrained per-bucket plans); running rows
  narrow to it, so a row that sees an attention-heavy and an MLP-heavy plan keeps less than
  either.
- `no-thrash`: the engine's rule, `rap.serving.row_masks.next_mask` (the function the engine
  runs): shrink now, grow after the budget has allowed it for `grow_after_s`, cross between
  incomparable masks only when idle or when the budget forces the intersection.

The simulation is at mask level (no forward pass): Poisson arrivals whose rate swings between
0.2 and 1.8 requests/s over two minutes, prompts of 32–768 tokens and 32–512 new tokens at 20
tokens/s a row, at most 8 rows; the budget is 80 % of the dense bytes (weights + KV + the engine
step, the planners' accounting) at 8 rows × 1,024 tokens,
falling to 55 % and 65 % for two shocks. Planners: the shipped RAP policy and the heuristic
planner (`gsi` scores), float16 byte accounting. Figures per finished row: the quality cost of
the mask it was served under (the surrogate's Δ ln perplexity, and with `--measure` the ln
perplexity measured on the `eval` text for every distinct mask), its regret against the plan
of the bucket it was admitted in, mask changes, rows that fell below the 0.5 floor (the engine
would preempt and recompute them), and restores (grows: bytes read back).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rap.core import byte_table, memory
from rap.core.errors import BudgetError
from rap.core.loading import load_config
from rap.core.masks import KeepMask
from rap.planning import HeuristicPolicy, RapPolicy
from rap.serving import row_masks

DTYPE = "float16"
DT_S = 0.25
TOKENS_PER_S = 20
MAX_ROWS = 8
FLOOR = 0.5
GROW_AFTER_S = 5.0
TARGET_SEQ = 1024
BATCHES, SEQS = (1, 4, 8), (256, 1024, 2048)


@dataclass
class Row:
    length: int
    left_s: float
    mask: KeepMask
    served: KeepMask
    """The smallest mask any of its steps ran under (what the response names)."""
    admitted_plan: KeepMask | None = None
    """What the rule planned for the load the row arrived in."""
    changes: int = 0
    preemptions: int = 0

    def record(self) -> dict[str, Any]:
        return {
            "served": self.served.key,
            "kept": self.served.kept_fraction,
            "mask": self.mask.key,
            "plan": self.admitted_plan.key if self.admitted_plan else self.mask.key,
            "changes": self.changes,
            "preemptions": self.preemptions,
        }


@dataclass
class Tally:
    rows: list[dict] = field(default_factory=list)
    restored_bytes: int = 0
    grows: int = 0
    preemptions: int = 0


def _round_up(value: int, edges: tuple[int, ...]) -> int:
    return next((e for e in edges if e >= value), edges[-1])


def dense_bytes(config: Any, batch: int, seq: int, mask: Any = None) -> int:
    """Bytes of `mask` (dense: None) at (B, S) in the one byte accounting the planners use:
    weights + KV + the engine step (`rap.core.byte_table.predicted_bytes`)."""
    mask = mask or memory.dense_mask(config)
    return byte_table.predicted_bytes(
        config, mask, batch, seq, DTYPE, include_activations=True, prefill_tokens=seq
    )


def trace(minutes: float, seed: int) -> tuple[list[list[tuple[int, float]]], list[float]]:
    """Arrivals per step ((tokens, seconds to run) each) and the budget share per step."""
    rng = np.random.default_rng(seed)
    steps = int(minutes * 60 / DT_S)
    arrivals, shares = [], []
    for i in range(steps):
        t = i * DT_S
        rate = 1.0 + 0.8 * math.sin(2 * math.pi * t / 120)
        new = []
        for _ in range(rng.poisson(rate * DT_S)):
            prompt, out = int(rng.integers(32, 769)), int(rng.integers(32, 513))
            new.append((prompt + out, out / TOKENS_PER_S))
        arrivals.append(new)
        phase = t % 300
        shares.append(0.55 if 90 <= phase < 130 else 0.65 if 210 <= phase < 240 else 0.80)
    return arrivals, shares


class Planned:
    """The planner's mask per (budget, bucket), cached (planners are deterministic). Where
    nothing above the floor fits the bucket, the plan of the largest smaller batch bucket that
    fits (the engine would preempt the youngest rows down to it)."""

    def __init__(self, planner: Any, config: Any) -> None:
        self.planner, self.config = planner, config
        self.cache: dict[tuple[int, int, int], KeepMask] = {}

    def __call__(self, budget: int, batch: int, seq: int) -> KeepMask:
        key = (budget, batch, seq)
        if key not in self.cache:
            self.cache[key] = self._plan(budget, batch, seq)
        return self.cache[key]

    def _plan(self, budget: int, batch: int, seq: int) -> KeepMask:
        for b in [batch, *(e for e in reversed(BATCHES) if e < batch)]:
            try:
                return self.planner.plan(budget, b, seq)
            except BudgetError:
                continue
        return self.planner.plan(budget, 1, SEQS[0])

    def fits(self, mask: KeepMask, budget: int, batch: int, seq: int) -> bool:
        return dense_bytes(self.config, batch, seq, mask) <= budget


RULES = ("per-bucket", "per-bucket+no-thrash", "engine")


def choose_target(rule: str, plan: Planned, budget: int, rows: list[Row]) -> KeepMask:
    """The mask the replica aims at: its running rows' bucket's plan, or (`engine`, what
    `Sizing.choose` does) the dense model if a full batch of `target_seq` rows fits, else the
    plan for a full batch."""
    if rule == "engine":
        return plan(budget, MAX_ROWS, TARGET_SEQ)
    batch = _round_up(max(len(rows), 1), BATCHES)
    return plan(budget, batch, _round_up(max([SEQS[0], *(r.length for r in rows)]), SEQS))


def simulate(rule: str, plan: Planned, arrivals: list, shares: list[float], full: int) -> Tally:
    """One run of the trace under `rule`; what every finished row was served under."""
    tally, rows, queue = Tally(), [], []
    current = target = plan(full, 1, SEQS[0])
    since_s = 0.0
    for i, (new, share) in enumerate(zip(arrivals, shares, strict=True)):
        now_s, budget = i * DT_S, int(share * full)
        queue.extend(new)
        while queue and len(rows) < MAX_ROWS:  # admitted under the mask running now
            length, run_s = queue.pop(0)
            admitted = choose_target(rule, plan, budget, [*rows, Row(length, 0, current, current)])
            rows.append(Row(length, run_s, current, current, admitted))
        want = choose_target(rule, plan, budget, rows)
        if want.key != target.key:
            target, since_s = want, now_s
        nxt = target
        if rule != "per-bucket":
            batch = _round_up(max(len(rows), 1), BATCHES)
            seq = _round_up(max([SEQS[0], *(r.length for r in rows)]), SEQS)
            settled = now_s - since_s >= GROW_AFTER_S
            forced = not plan.fits(current, budget, batch, seq)
            nxt = row_masks.next_mask(current, target, settled, bool(rows), forced, FLOOR)
        if not row_masks.is_within(nxt, current):
            tally.grows += 1
            weights = memory.weight_bytes
            union = row_masks.union(current, nxt)
            tally.restored_bytes += weights(plan.config, union, DTYPE)
            tally.restored_bytes -= weights(plan.config, current, DTYPE)
        current = nxt
        for row in rows:
            step(row, current, tally)
        for row in [r for r in rows if r.left_s <= 0]:
            rows.remove(row)
            tally.rows.append(row.record())
    return tally


def step(row: Row, current: KeepMask, tally: Tally) -> None:
    """The row narrows to the running mask, or is preempted and recomputed under it where
    that would take it below the floor (`Scheduler.narrow_rows`); then runs a step."""
    narrowed = row_masks.intersect(row.mask, current)
    if narrowed.kept_fraction < FLOOR:
        row.mask, row.preemptions = current, row.preemptions + 1
        tally.preemptions += 1
    elif narrowed.key != row.mask.key:
        row.mask, row.changes = narrowed, row.changes + 1
    row.served = row_masks.intersect(row.served, row.mask)
    row.left_s -= DT_S


def summary(tally: Tally, q: dict[str, float], dense_q: float) -> dict[str, Any]:
    rows = tally.rows
    cost = [q[r["served"]] - dense_q for r in rows]
    regret = [q[r["served"]] - q[r["plan"]] for r in rows]
    n = len(rows)
    return {
        "rows": n,
        "mean_dlnppl": statistics.fmean(cost),
        "p90_dlnppl": float(np.percentile(cost, 90)),
        "mean_regret_vs_admission_plan": statistics.fmean(regret),
        "rows_changed": sum(r["changes"] > 0 for r in rows) / n,
        "mean_changes": statistics.fmean(r["changes"] for r in rows),
        "rows_preempted": sum(r["preemptions"] > 0 for r in rows) / n,
        "mean_kept": statistics.fmean(r["kept"] for r in rows),
        "grows": tally.grows,
        "restored_gib": tally.restored_bytes / 2**30,
    }


def planners(config: Any, model_id: str) -> dict[str, Any]:
    """The shipped RAP policy and two stored-score planners, all with the serving floor."""
    return {
        "rap": RapPolicy.load(None, config, model_id, DTYPE, FLOOR),
        "mem-greedy": HeuristicPolicy(config, model_id, DTYPE, "mem-greedy", FLOOR),
        "gsi": HeuristicPolicy(config, model_id, DTYPE, "gsi", FLOOR),
    }


def quality(keys: set[str], measure: bool) -> dict[str, float]:
    """ln perplexity per mask key: the surrogate's, or measured on the `eval` text."""
    if not measure:
        from rap.planning.surrogate import load_surrogate

        ks = sorted(keys)
        return dict(zip(ks, load_surrogate().predict(ks).tolist(), strict=True))
    import torch
    from tqdm import tqdm

    from rap.core.loading import load_model
    from rap.importance.quality import Meter

    torch.set_num_threads(2)
    meter = Meter(load_model("smollm2", dtype="float32", device="cpu"), "eval")
    return {k: meter.lnppl(k) for k in tqdm(sorted(keys, key=len), desc="ln ppl", unit="mask")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0, help="simulated minutes of traffic")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--measure", action="store_true", help="measure ln ppl (minutes on a CPU)")
    ap.add_argument("--out", default="bench/results/mask_rules.json")
    args = ap.parse_args()
    config, model_id = load_config("smollm2")
    full = dense_bytes(config, MAX_ROWS, 1024)
    arrivals, shares = trace(args.minutes, args.seed)
    tallies = {}
    for name, planner in planners(config, model_id).items():
        plan = Planned(planner, config)
        for rule in RULES:
            tallies[(name, rule)] = simulate(rule, plan, arrivals, shares, full)
    keys = {r[k] for t in tallies.values() for r in t.rows for k in ("served", "plan")} | {""}
    q = quality(keys, args.measure)
    results = {f"{n}/{r}": summary(t, q, q[""]) for (n, r), t in tallies.items()}
    header = f"{'planner/rule':31} {'rows':>5} {'Δlnppl':>8} {'p90':>7} {'regret':>8} "
    print(header + f"{'changed':>8} {'preempt':>7} {'kept':>5} {'grows':>6} {'GiB back':>9}")
    for name, s in results.items():
        print(
            f"{name:31} {s['rows']:5d} {s['mean_dlnppl']:8.4f} {s['p90_dlnppl']:7.4f} "
            f"{s['mean_regret_vs_admission_plan']:8.4f} {s['rows_changed']:8.1%} "
            f"{s['rows_preempted']:7.1%} {s['mean_kept']:5.2f} {s['grows']:6d} "
            f"{s['restored_gib']:9.2f}"
        )
    doc = {
        "quality": "measured ln ppl (eval text)" if args.measure else "surrogate Δ ln ppl",
        "minutes": args.minutes,
        "seed": args.seed,
        "distinct_masks": len(keys),
        "results": results,
    }
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
