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


def admit(row: Any, model_mask: KeepMask) -> None:
    """A row starts computing under the model's mask (again, after a preemption: its KV is
    recomputed under this mask from the first token); what it is served under narrows."""
    row.mask = model_mask
    row.history.append((0, model_mask.key))
    if row.served is None:
        row.served = model_mask
    elif not is_within(row.served, model_mask):
        row.served, row.mask_changes = intersect(row.served, model_mask), row.mask_changes + 1


def follow(row: Any, model_mask: KeepMask) -> list[int]:
    """Narrow a running row to the model's mask; returns the attention layers it lost, whose
    pages the caller frees. Counts the change and notes where it happened."""
    narrowed = intersect(row.mask, model_mask)
    if narrowed.key == row.mask.key:
        return []
    pairs = zip(row.mask.attn, narrowed.attn, strict=True)
    lost = [layer for layer, (was, now) in enumerate(pairs) if was and not now]
    row.mask, row.history = narrowed, [*row.history, (row.held, narrowed.key)]
    if not is_within(row.served, narrowed):
        row.served, row.mask_changes = intersect(row.served, narrowed), row.mask_changes + 1
    return lost


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


def switch(scheduler: Any, mask: KeepMask, floor: float = 0.0, fetched: dict | None = None) -> None:
    """Make `mask` the model's under running rows: each row loses what `mask` drops from the
    next step (pages and reservations in those attention layers go back, then the layers'
    slabs are freed whole); blocks `mask` restores get slabs of the pool's capacity, used by
    rows admitted from now on. Weights: every drop before any restore (`PrunableModel.apply`).
    A row that would fall below the quality floor (`floor`, or its request's own minimum) is
    preempted instead, to be recomputed under a mask that meets it. `fetched`: the restored
    blocks already read (`rap.serving.restores`)."""
    old, pool = scheduler.model.mask, scheduler.pool
    narrowed = intersect(old, mask)
    for row in list(scheduler.running):
        least = max(floor, row.request.min_kept_fraction)
        if intersect(row.mask, narrowed).kept_fraction < least:
            scheduler.preempt(row)
    for row in scheduler.running:
        for layer in follow(row, narrowed):
            pages = row.pages.pop(layer, None)
            if pages is not None:
                pool.release(layer, pages.pages)
            row.reserved.pop(layer, None)
    for layer, (was, now) in enumerate(zip(old.attn, mask.attn, strict=True)):
        if was and not now:
            pool.drop_layer(layer)
    scheduler.model.apply(mask, fetched=fetched)  # restores read beforehand only bind
    for layer, (was, now) in enumerate(zip(old.attn, mask.attn, strict=True)):
        if now and not was:
            pool.add_layer(layer)


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
