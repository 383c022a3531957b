"""Budget planners: given a memory budget and a workload (batch B, sequence S), a mask that fits.

A mask fits when its predicted bytes (the memory model, `rap.core.memory`) are within the budget:

    bytes(mask) = weights(mask) + kv(mask, B, S) [+ activations(B, P) with include_activations]

Dropping block b frees bytes_b: an MLP block frees its weights; the attention block of layer l
frees its weights plus that layer's KV cache, 2 · n_kv · d · B · tokens_l(S) · b. Planners drop
blocks until the mask fits, each in its own order, from stored block scores (`rap.core.scores`):
no forward pass, well under a millisecond (`bench/planner_speed.py`).

    gsi         the stored GSI removal order (the paper's baseline order)
    oneshot     ascending one-shot Δ perplexity (each block scored alone): GSI without re-scoring
    mem-greedy  repeatedly the block with the least cost per useful byte freed,
                cost_b / min(bytes_b, deficit), cost_b from `BlockScores.costs` (GSI's
                marginal costs, never falling along its order): once the deficit is smaller
                than a block, bytes beyond it are worth nothing, so the ranking is re-scored as
                the deficit shrinks
    shortgpt    whole layers (attention and MLP together), lowest Block Influence first
    attn-drop   attention blocks only, lowest BI first;  mlp-drop: MLP blocks only
    random      a seeded random order of all blocks
    oracle      beam search scored by measured perplexity (`rap.importance.oracle`; needs the
                model loaded)

A budget that the method cannot meet — below its smallest reachable mask, or with fewer than
`min_kept_fraction` of the 2·L blocks kept — raises `BudgetError` naming that minimum.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

from rap.core.byte_table import ByteTable, byte_table
from rap.core.constants import MIB
from rap.core.errors import BudgetError, RapError
from rap.core.masks import Block, KeepMask, layer_blocks, max_drops
from rap.core.scores import BlockScores, find_scores

PLANNERS = ("gsi", "oneshot", "mem-greedy", "shortgpt", "attn-drop", "mlp-drop", "random", "oracle")
SERVING_PLANNERS = ("mem-greedy", "gsi", "oneshot", "shortgpt", "attn-drop", "mlp-drop", "random")
"""Planners that need no forward pass (stored scores or none): what serving may run."""
SCORES_FOR = {
    "gsi": "gsi",
    "oneshot": "oneshot",
    "mem-greedy": "gsi",
    "shortgpt": "bi",
    "attn-drop": "bi",
    "mlp-drop": "bi",
}
"""The stored scores each planner reads when none are passed."""


def _order(method: str, scores: BlockScores | None, n: int, seed: int) -> list[list[Block]]:
    """The drop sequence of a static planner; each item is dropped as one step."""
    if method == "random":
        blocks = layer_blocks(n)
        random.Random(seed).shuffle(blocks)
        return [[b] for b in blocks]
    assert scores is not None
    if method == "gsi":
        if scores.order is None:
            raise RapError(f"planner gsi needs GSI scores, got {scores.method} scores")
        return [[b] for b in scores.removal_order()]
    if method == "oneshot":
        return [[b] for b in scores.removal_order()]
    if method == "shortgpt":
        layer = scores.layers or tuple(a + m for a, m in zip(scores.attn, scores.mlp, strict=True))
        return [[("attn", i), ("mlp", i)] for i in sorted(range(n), key=lambda i: layer[i])]
    kind = "attn" if method == "attn-drop" else "mlp"
    return [[(kind, i)] for i in sorted(range(n), key=lambda i: scores.score(kind, i))]


def _greedy(table: ByteTable, scores: BlockScores, budget: int) -> Iterator[list[Block]]:
    """mem-greedy's sequence: least cost per useful byte, re-scored as the deficit shrinks."""
    n = len(table.attn)
    blocks = layer_blocks(n)
    cost = scores.costs()
    # Ties (GSI's running-max costs have many) go by the scores' own order, never by set order,
    # which follows string hashes and so changed from one process to the next.
    rank = {b: r for r, b in enumerate(scores.removal_order())}
    biggest = max(table.of(b) for b in blocks)
    # While the deficit is at least the biggest block, min(bytes, deficit) = bytes and the
    # ranking is static: sort once (ties: more bytes first). Then re-score each step.
    static = sorted(blocks, key=lambda b: (cost[b] / table.of(b), -table.of(b), rank[b]))
    left, used, i = set(blocks), table.dense(), 0
    while left and used > budget:
        deficit = used - budget
        if deficit >= biggest:
            while static[i] not in left:
                i += 1
            b = static[i]
        else:
            b = min(
                left, key=lambda x: (cost[x] / min(table.of(x), deficit), -table.of(x), rank[x])
            )
        left.discard(b)
        used -= table.of(b)
        yield [b]


def _scores_for(method: str, model_id: str, n: int, scores: BlockScores | None) -> Any:
    if method not in PLANNERS:
        raise RapError(f"unknown planner {method!r}", expected=f"one of {', '.join(PLANNERS)}")
    if method == "oracle":
        raise RapError(
            "the oracle needs a loaded model", fix="call rap.importance.oracle.oracle_mask"
        )
    if method == "random":
        return None
    scores = scores or find_scores(model_id, SCORES_FOR[method])
    scores.check_for(model_id, n)
    return scores


def _walk(
    method: str, table: ByteTable, scores: Any, budget: int, max_drops: int, seed: int
) -> tuple[list[bool], list[bool], int]:
    """Drop blocks in the method's order until `budget` is met or no drop is allowed."""
    n = len(table.attn)
    keep = {"attn": [True] * n, "mlp": [True] * n}
    used, drops = table.dense(), 0
    steps = _greedy(table, scores, budget) if method == "mem-greedy" else None
    for group in steps or _order(method, scores, n, seed):
        if used <= budget or drops + len(group) > max_drops:
            break
        for kind, layer in group:
            keep[kind][layer] = False
            used -= table.of((kind, layer))
        drops += len(group)
    return keep["attn"], keep["mlp"], used


def plan_mask(
    method: str,
    config: Any,
    model_id: str,
    budget_bytes: int,
    batch: int,
    seq: int,
    dtype: Any,
    scores: BlockScores | None = None,
    *,
    include_activations: bool = False,
    prefill_tokens: int | None = None,
    min_kept_fraction: float = 0.0,
    seed: int = 0,
) -> KeepMask:
    """A KeepMask whose predicted bytes at (batch, seq) fit `budget_bytes` (see module doc)."""
    table = byte_table(config, batch, seq, dtype, include_activations, prefill_tokens)
    n = len(table.attn)
    scores = _scores_for(method, model_id, n, scores)
    attn, mlp, used = _walk(
        method, table, scores, budget_bytes, max_drops(2 * n, min_kept_fraction), seed
    )
    if used > budget_bytes:
        # With the budget at 0 the walk ends at the method's smallest reachable mask: `used`.
        raise _too_small(method, table, budget_bytes, used, batch, seq, dtype, min_kept_fraction)
    return KeepMask(model=model_id, attn=tuple(attn), mlp=tuple(mlp), source="local")


def minimum_bytes(
    method: str,
    config: Any,
    model_id: str,
    batch: int,
    seq: int,
    dtype: Any,
    scores: BlockScores | None = None,
    *,
    include_activations: bool = False,
    prefill_tokens: int | None = None,
    min_kept_fraction: float = 0.0,
    seed: int = 0,
) -> int:
    """Bytes of the smallest mask `method` can reach at (batch, seq) (what a budget of 0 gets)."""
    table = byte_table(config, batch, seq, dtype, include_activations, prefill_tokens)
    n = len(table.attn)
    scores = _scores_for(method, model_id, n, scores)
    return _walk(method, table, scores, -1, max_drops(2 * n, min_kept_fraction), seed)[2]


def _too_small(
    method: str,
    table: ByteTable,
    budget: int,
    minimum: int,
    batch: int,
    seq: int,
    dtype: Any,
    min_kept: float,
) -> BudgetError:
    floor = f", keeping at least {min_kept:.0%} of blocks" if min_kept > 0 else ""
    return BudgetError(
        f"budget {budget:,} B ({budget / MIB:,.2f} MiB) is below the smallest mask planner "
        f"{method} can reach at batch {batch} × {seq} tokens in {dtype}{floor}: "
        f"{minimum:,} B ({minimum / MIB:,.2f} MiB); with every block dropped the model needs "
        f"{table.base:,} B ({table.base / MIB:,.2f} MiB)",
        expected=f"a budget of at least {minimum:,} B",
        fix="raise the budget, shorten the batch or its sequences, or lower the quality floor",
    )
