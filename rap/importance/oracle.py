"""The oracle planner: beam search over drop sets, scored by measured perplexity.

A reference for small models, never for serving. States are sets of dropped blocks; from each
of the `beam` best states not yet fitting, every further block is tried:

    children(D) = { D ∪ {b} : b kept in D },   score(D) = NLL(dense − D) on calibration chunks

A child that fits the budget is a finished plan and is not expanded further; the `beam` best
children that do not fit form the next frontier (children whose NLL already exceeds the best
finished plan are pruned: dropping more rarely helps). The search ends when the frontier is
empty; the finished plan with the lowest NLL is returned with the number of evaluations spent.
Cost: at most beam · (2L)² evaluations, each a forward pass over the chunks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from rap.core.byte_table import ByteTable, byte_table
from rap.core.constants import MIB
from rap.core.errors import BudgetError
from rap.core.masks import Block, KeepMask, layer_blocks, max_drops
from rap.core.model import PrunableModel
from rap.importance.nll import NllEvaluator


def _beam_search(
    ev: NllEvaluator,
    dense: KeepMask,
    table: ByteTable,
    budget: int,
    blocks: list[Block],
    beam: int,
    max_drops: int,
) -> tuple[float, frozenset[Block]] | None:
    """The fitting drop set of lowest NLL that the beam reaches (None: none fits)."""
    frontier: list[frozenset[Block]] = [frozenset()]
    seen: set[frozenset[Block]] = set()
    best: tuple[float, frozenset[Block]] | None = None
    while frontier:
        children: list[tuple[float, frozenset[Block]]] = []
        for dropped in frontier:
            if len(dropped) >= max_drops:
                continue
            for b in blocks:
                child = dropped | {b}
                if b in dropped or child in seen:
                    continue
                seen.add(child)
                nll = ev.run(dense.without(*child)).total
                if table.dense() - sum(table.of(x) for x in child) <= budget:
                    if best is None or nll < best[0]:
                        best = (nll, child)
                elif best is None or nll < best[0]:  # worse than a finished plan: pruned
                    children.append((nll, child))
        frontier = [c for _, c in sorted(children, key=lambda t: t[0])[:beam]]
    return best


@dataclass
class OraclePlan:
    mask: KeepMask
    ppl: float
    evaluations: int
    predicted_bytes: int


def oracle_mask(
    model: PrunableModel,
    ids: torch.Tensor,
    budget_bytes: int,
    batch: int,
    seq: int,
    dtype: Any,
    *,
    beam: int = 4,
    include_activations: bool = False,
    prefill_tokens: int | None = None,
    min_kept_fraction: float = 0.0,
    batch_size: int = 4,
) -> OraclePlan:
    """The best mask that fits `budget_bytes` at (batch, seq) found by beam search (see above)."""
    if beam < 1:
        raise ValueError("beam width must be at least 1")
    table = byte_table(model.config, batch, seq, dtype, include_activations, prefill_tokens)
    n = model.num_layers
    drops = max_drops(2 * n, min_kept_fraction)
    ev = NllEvaluator(model, ids, batch_size)
    dense = model.dense_mask()
    if table.dense() <= budget_bytes:
        return OraclePlan(dense, ev.perplexity(ev.run(dense).total), ev.runs, table.dense())
    blocks = layer_blocks(n)
    best = _beam_search(ev, dense, table, budget_bytes, blocks, beam, drops)
    model.apply(dense)
    if best is None:
        floor = table.base + sum(sorted(table.of(b) for b in blocks)[: 2 * n - drops])
        raise BudgetError(
            f"no mask of at most {drops} drops fits {budget_bytes / MIB:,.2f} MiB; the "
            f"smallest allowed needs {floor:,} B ({floor / MIB:,.2f} MiB)",
            expected=f"a budget of at least {floor:,} B",
        )
    nll, dropped = best
    mask = dense.without(*dropped).model_copy(update={"source": "local"})
    used = table.dense() - sum(table.of(x) for x in dropped)
    return OraclePlan(mask, ev.perplexity(nll), ev.runs, used)
