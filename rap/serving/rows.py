"""A request inside the scheduler: what the client asked for, the row it becomes, and the
events that end it (`rap.serving.scheduler` runs them)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from rap.core.masks import KeepMask
from rap.serving import row_masks
from rap.serving.kv_pages import PagePool, RowPages
from rap.serving.text_stream import TextStream

Sink = Callable[[dict[str, Any]], None]


@dataclass
class Request:
    """What a client asked for, as token ids."""

    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False
    """Run to `max_tokens` whatever the model says (benchmarks: equal work for every system)."""
    deadline_s: float | None = None
    """`time.monotonic()` after which the request ends, waiting or running (a 504 error)."""
    min_kept_fraction: float = 0.0
    """Run only under masks keeping at least this share of blocks (1.0: the dense model)."""


@dataclass
class Row:
    """A request inside the scheduler."""

    id: int
    request: Request
    sink: Sink
    text: TextStream
    arrived_s: float
    pages: dict[int, RowPages] = field(default_factory=dict)
    reserved: dict[int, int] = field(default_factory=dict)
    held: int = 0
    """Tokens written to the KV cache (prompt first, then generated)."""
    generated: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    mask: KeepMask | None = None
    """The mask the row computes under (`rap.serving.row_masks`): the model's at admission,
    narrowed by every shrink since."""
    served: KeepMask | None = None
    """The smallest mask any of its tokens ran under (what the response names): `mask`, and
    before a preemption the masks it ran under then."""
    mask_changes: int = 0
    preemptions: int = 0
    history: list[tuple[int, str]] = field(default_factory=list)
    """(tokens held, mask key) at admission and at every shrink: what ran at which position."""

    @property
    def tokens(self) -> list[int]:
        return self.request.prompt_ids + self.generated

    @property
    def prefilling(self) -> bool:
        """More than one known token not yet in the KV cache: the prompt, or after a
        preemption the prompt and the tokens generated so far (recomputed)."""
        return self.held < len(self.tokens) - 1


@dataclass
class StepStats:
    steps: int = 0
    forwards: int = 0
    tokens: int = 0
    """Tokens through the model (prompt chunks and decodes)."""
    generated: int = 0
    prefill_tokens: int = 0
    admitted: int = 0
    preempted: int = 0
    longest: int = 0
    """Longest row (prompt + max_tokens) admitted since the engine last read it."""


def done_event(row: Row, reason: str, counted: int = 0) -> dict[str, Any]:
    """The row's last event when it ends well: why, its tokens, the mask it was served under."""
    event = {
        "type": "done",
        "finish_reason": reason,
        "completion_tokens": len(row.generated) + counted,
        "token_ids": list(row.generated),
    }
    if row.served is not None:  # the smallest mask it ran under, and how often it shrank
        event["fingerprint"] = row_masks.fingerprint(row.served, row.mask_changes)
        event["mask_key"] = row.served.key
        event["mask_changes"] = row.mask_changes
        event["mask_history"] = list(row.history)
    return event


def busy_event(retry_after_s: int, why: str) -> dict[str, Any]:
    """A 503 for a request that waited `max_wait_s` and could not start (code `waited_out`:
    the router does not make it wait as long again elsewhere)."""
    return {
        "type": "error",
        "status": 503,
        "code": "waited_out",
        "message": f"the replica is busy: {why}",
        "retry_after": retry_after_s,
    }


def too_big_event(need: dict[int, int], pool: PagePool, retry_after_s: int) -> dict[str, Any]:
    """A 503 for a request whose reservation exceeds the whole pool."""
    most = max(need.values())
    return {
        "type": "error",
        "status": 503,
        "retry_after": retry_after_s,
        "message": f"not enough memory: the request needs {most} KV pages of "
        f"{pool.page_tokens} tokens per layer; the replica's pool has "
        f"{pool.capacity}",
    }
