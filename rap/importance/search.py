"""Measured-perplexity searches over blocks: one-shot scan and Greedy Sequential Importance.

Blocks are `(kind, layer)` with kind `attn` or `mlp`; a mask minus a set of blocks is that mask
with those blocks dropped. NLL is the summed negative log-likelihood of the calibration chunks
(`rap.importance.nll`), so lower is better and Δ is in nats over all predicted tokens.

    one-shot:  Δ_b = NLL(dense − b) − NLL(dense)                         for every block b
    GSI:       M_0 = dense;  b_k = argmin_{b ∈ M_k} NLL(M_k − b);  M_{k+1} = M_k − b_k
               (the paper's greedy order: at every step drop the block whose removal raises
               calibration perplexity least, then re-score the rest)

Each GSI step is a *screen then confirm* race: every remaining candidate is scored on the first
`screen_batches` batches; the `finalists` best are run on the remaining batches, stopping a
finalist as soon as its partial sum passes the best total so far (exact: NLL terms are ≥ 0).
With `screen_batches=0` every candidate runs on every batch: the exact GSI. Both settings are
recorded with the result, and a test checks that the race picks the exhaustive GSI's order.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rap.core.masks import Block, KeepMask
from rap.importance.nll import NllEvaluator, RunResult, States

Progress = Callable[[int, int, str], None]
"""(step done, steps in all, note): the caller's progress bar."""


@dataclass
class OneShot:
    """Dense NLL and, per block, the NLL of the model without it (per chunk as well)."""

    dense_nll: float
    nll: dict[Block, float]
    chunk_nll: dict[Block, list[float]]
    dense_chunk_nll: list[float]
    seconds: float


def one_shot(ev: NllEvaluator, progress: Progress | None = None) -> OneShot:
    """Score every block alone against the dense model (runs start at the block's layer)."""
    t0 = time.perf_counter()
    dense = ev.model.dense_mask()
    states, base = ev.capture_all(dense)
    blocks = dense.kept_blocks()
    nll: dict[Block, float] = {}
    per_chunk: dict[Block, list[float]] = {}
    for i, block in enumerate(blocks):
        res = ev.run(dense.without(block), block[1], states)
        nll[block] = res.total
        per_chunk[block] = _chunks(res)
        if progress:
            progress(i + 1, len(blocks), f"{block[0]} {block[1]}")
    return OneShot(base.total, nll, per_chunk, _chunks(base), time.perf_counter() - t0)


@dataclass
class Step:
    """One GSI step: the block dropped and the calibration NLL with it gone."""

    kind: str
    layer: int
    nll: float
    candidates: int
    finalists: int


@dataclass
class GsiResult:
    dense_nll: float
    steps: list[Step] = field(default_factory=list)
    seconds: float = 0.0
    runs: int = 0
    full_equivalents: float = 0.0


def gsi(
    ev: NllEvaluator,
    screen_batches: int = 1,
    finalists: int = 4,
    first: OneShot | None = None,
    progress: Progress | None = None,
    checkpoint: Path | None = None,
) -> GsiResult:
    """The whole GSI removal order (every block), with the NLL after each step.

    `first`: a one-shot scan on the same chunks; its scores are step 1's exactly, so step 1
    only re-runs the winner to capture its states. `checkpoint`: a JSON file rewritten after
    every step; a run that finds one resumes after its last step (one capture pass).
    """
    t0 = time.perf_counter()
    result = _resume(checkpoint) if checkpoint else None
    done = [(s.kind, s.layer) for s in result.steps] if result else []
    mask = ev.model.dense_mask().without(*done)
    states, base = ev.capture_all(mask)
    if result is None:
        result = GsiResult(dense_nll=base.total)
    # A resumed run adds to what the interrupted one spent.
    spent, runs, equivalents = result.seconds, result.runs, result.full_equivalents
    total_steps = 2 * ev.model.num_layers
    for k in range(len(result.steps), total_steps):
        cands = mask.kept_blocks()
        if k == 0 and first is not None:
            block = min(cands, key=lambda b: first.nll[b])
            win = ev.run(mask.without(block), block[1], states, capture=True)
            step = Step(block[0], block[1], win.total, len(cands), 0)
        else:
            step, win = _step(ev, mask, states, cands, screen_batches, finalists)
        for layer, per_batch in win.captured.items():
            states.setdefault(layer, {}).update(per_batch)
        mask = mask.without((step.kind, step.layer))
        result.steps.append(step)
        result.seconds = spent + time.perf_counter() - t0
        result.runs, result.full_equivalents = runs + ev.runs, equivalents + ev.full_equivalents()
        if checkpoint:
            _save(checkpoint, result)
        if progress:
            ppl = ev.perplexity(step.nll)
            progress(k + 1, total_steps, f"drop {step.kind} {step.layer}, ppl {ppl:.2f}")
    return result


def _save(path: Path, result: GsiResult) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(result)))
    tmp.replace(path)


def _resume(path: Path) -> GsiResult | None:
    if not path.is_file():
        return None
    raw = json.loads(path.read_text())
    raw["steps"] = [Step(**s) for s in raw["steps"]]
    return GsiResult(**raw)


def _step(
    ev: NllEvaluator,
    mask: KeepMask,
    states: States,
    cands: list[Block],
    screen_batches: int,
    finalists: int,
) -> tuple[Step, RunResult]:
    """One GSI step: screen every candidate, confirm the finalists, capture the winner's states."""
    screen = min(screen_batches, ev.num_batches)
    if len(cands) <= finalists or screen in (0, ev.num_batches):
        screen, chosen = 0, cands
        partial = dict.fromkeys(cands, 0.0)
    else:
        partial = {c: ev.run(mask.without(c), c[1], states, range(screen)).total for c in cands}
        chosen = sorted(cands, key=lambda c: partial[c])[:finalists]
    rest = range(screen, ev.num_batches)
    best: tuple[float, Block, RunResult] | None = None
    for c in chosen:
        bound = math.inf if best is None else best[0] - partial[c]
        res = ev.run(mask.without(c), c[1], states, rest, capture=True, bound=bound)
        total = partial[c] + res.total
        if not res.stopped and (best is None or total < best[0]):
            best = (total, c, res)
    assert best is not None
    total, block, win = best
    if screen:  # the winner's screened batches were run without capturing: capture them now
        head = ev.run(mask.without(block), block[1], states, range(screen), capture=True)
        for layer, per_batch in head.captured.items():
            win.captured.setdefault(layer, {}).update(per_batch)
    return Step(block[0], block[1], total, len(cands), len(chosen)), win


def _chunks(res: RunResult) -> list[float]:
    return [float(x) for b in sorted(res.chunk_nll) for x in res.chunk_nll[b]]


def exhaustive_gsi(ev: NllEvaluator) -> list[Block]:
    """Reference GSI with full forward passes and no shortcuts (tests, tiny models only)."""
    mask = ev.model.dense_mask()
    order: list[Block] = []
    while cands := mask.kept_blocks():
        block = min(cands, key=lambda c: ev.run(mask.without(c)).total)
        order.append(block)
        mask = mask.without(block)
    return order
