"""Each row's own mask under continuous batching (invariant 1 of docs/architecture.md).

A row's effective mask is the intersection of every mask the model ran while the row ran:

    E_r ← M_admit                 when the row is admitted (the model's mask then)
    E_r ← E_r ∩ M                 at every step (a shrink reaches every running row at once)

so it only shrinks: a block restored after admission is skipped by the row (its KV there does
not exist), and a block dropped while it runs is gone for it from the next step, with its pages
in a dropped attention layer freed at once. A step gates every block the model keeps but some
row in the step does not (`gate_positions`, run by `rap.core.gates`): still one forward.

The response names the effective mask and how many times it shrank (`fingerprint`).
"""

from __future__ import annotations

from typing import Any

import torch

from rap.core.masks import KeepMask, layer_blocks

Block = tuple[str, int]


def intersect(a: KeepMask, b: KeepMask) -> KeepMask:
    """Blocks both keep; `a`'s label and version (the row's mask, narrowed)."""
    attn = tuple(x and y for x, y in zip(a.attn, b.attn, strict=True))
    mlp = tuple(x and y for x, y in zip(a.mlp, b.mlp, strict=True))
    return a.model_copy(update={"attn": attn, "mlp": mlp})


def union(a: KeepMask, b: KeepMask) -> KeepMask:
    """Blocks either keeps (what a switch from one to the other holds at most, restores read
    before the drops); `b`'s label and version."""
    attn = tuple(x or y for x, y in zip(a.attn, b.attn, strict=True))
    mlp = tuple(x or y for x, y in zip(a.mlp, b.mlp, strict=True))
    return b.model_copy(update={"attn": attn, "mlp": mlp})


def is_within(a: KeepMask, b: KeepMask) -> bool:
    """Whether every block `a` keeps, `b` keeps too."""
    return all(not keep or b.keeps(block) for block, keep in _kept(a))


def _kept(mask: KeepMask) -> list[tuple[Block, bool]]:
    return [(block, mask.keeps(block)) for block in layer_blocks(mask.num_layers)]


def next_mask(
    current: KeepMask,
    target: KeepMask,
    settled: bool,
    running: bool,
    forced: bool,
    floor: float = 0.0,
) -> KeepMask:
    """The no-thrash rule (docs/engine.md): the mask to run now on the way to `target`.

    A shrink (`target` inside `current`) now. A grow (`current` inside `target`) once `settled`
    (the budget has allowed it long enough). A change between masks neither of which holds the
    other — running rows would keep the intersection of both — once settled and no row runs;
    before that, only if `forced` (the current mask no longer fits the budget) its shrinking
    half, the intersection, now (the rest follows as a grow) — or `target` itself where the
    intersection falls below `floor` (the model never runs below it; rows it would take below
    are preempted and recomputed)."""
    if target.key == current.key or is_within(target, current):
        return target
    if settled and (is_within(current, target) or not running):
        return target
    if not forced:
        return current
    both = intersect(target, current)
    return both if both.kept_fraction >= floor else target


def gate_positions(
    steps: list[tuple[Any, Any]], model_mask: KeepMask, device: torch.device
) -> dict[Block, torch.Tensor]:
    """For each block the model keeps but some row of the step skips: the flat-sequence
    positions of the rows that use it (`steps`: (row, RowStep) pairs in sequence order)."""
    gates: dict[Block, torch.Tensor] = {}
    key = model_mask.key
    if all(r.mask is not None and r.mask.key == key for r, _ in steps):
        return gates  # the usual step: every row runs the model's blocks (no per-block scan)
    for block in model_mask.kept_blocks():
        users = [s for r, s in steps if r.mask.keeps(block)]
        if len(users) == len(steps):
            continue
        where = [p for s in users for p in range(s.offset, s.offset + s.count)]
        gates[block] = torch.tensor(where, dtype=torch.long, device=device)
    return gates


def fingerprint(mask: KeepMask, changes: int) -> str:
    """The effective mask's tag, with the number of times it shrank while the row ran."""
    base = mask.fingerprint()
    return f"{base}-changes{changes}" if changes else base
