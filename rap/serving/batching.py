"""What one step runs: the rows of the step and their tokens, in plain Python (no tensors).

Decoding rows give one token each, first; prefilling rows then share the rest of the step's
token budget (`max_step_tokens`) in admission order, so a long prompt delays running rows by
one chunk at most. A row whose client has not read its events sits the step out (keeping its
pages). The rows are flattened into one sequence: each row's tokens at `RowStep.offset`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from rap.serving.paged_attention import RowStep
from rap.serving.rows import Row


@dataclass
class Batch:
    """One step's rows (with where their tokens sit in the flat sequence), ids and positions."""

    rows: list[tuple[Row, RowStep]] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    prefill_tokens: int = 0


def compose(running: list[Row], step_tokens: int, sits_out: Callable[[Row], bool]) -> Batch:
    """Decoding rows one token each, then prompt chunks within `step_tokens` (module doc)."""
    budget, prefill_tokens = step_tokens, 0
    rows: list[tuple[Row, RowStep]] = []
    ids: list[int] = []
    positions: list[int] = []
    for row in sorted(running, key=lambda r: r.prefilling):  # decodes first, stable
        if sits_out(row):
            continue
        if row.prefilling:
            n = min(len(row.tokens) - row.held, budget)
            if n <= 0:
                continue
        else:
            n = 1
        tokens = row.tokens[row.held : row.held + n]
        rows.append((row, RowStep(row.pages, len(ids), n, row.held)))
        ids += tokens
        positions += range(row.held, row.held + n)
        budget -= n
        if row.prefilling:
            prefill_tokens += n
    return Batch(rows, ids, positions, prefill_tokens)
