"""A request inside the scheduler: what the client asked for, the row it becomes, and the
events that end it (`rap.serving.scheduler` runs them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from rap.core.masks import KeepMask
from rap.serving import row_masks
from rap.serving.events import DoneEvent, ErrorEvent, FinishReason, Sink, error_event
from rap.serving.kv_pages import PagePool, RowPages
from rap.serving.text_stream import TextStream


class WaitConfig(Protocol):
    """What a waited-out event says: how long a row may wait, and when to retry."""

    max_wait_s: float
    retry_after_s: int


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
    stalled_s: float | None = None
    """`time.monotonic()` since when the row's outbox has been full (None: it is not)."""

    @property
    def tokens(self) -> list[int]:
        return self.request.prompt_ids + self.generated

    @property
    def prefilling(self) -> bool:
        """More than one known token not yet in the KV cache: the prompt, or after a
        preemption the prompt and the tokens generated so far (recomputed)."""
        return self.held < len(self.tokens) - 1

    # -- what the scheduler changes, by name (one owner: the engine's thread) -------------------
    def start_under(self, model_mask: KeepMask, reserved: dict[int, int]) -> None:
        """Admitted with `reserved` pages per layer: it computes under the model's mask (again,
        after a preemption: its KV is recomputed under this mask from the first token); what it
        is served under narrows (`rap.serving.row_masks`)."""
        self.reserved = reserved
        self.mask = model_mask
        self.history.append((0, model_mask.key))
        if self.served is None:
            self.served = model_mask
        elif not row_masks.is_within(self.served, model_mask):
            self.served = row_masks.intersect(self.served, model_mask)
            self.mask_changes += 1

    def narrow_to(self, model_mask: KeepMask) -> list[int]:
        """Narrow to the model's mask while running; returns the attention layers it lost
        (whose pages and reservations the scheduler takes back: `lose_layer`). Counts the
        change and notes where it happened."""
        assert self.mask is not None and self.served is not None, "a running row has masks"
        narrowed = row_masks.intersect(self.mask, model_mask)
        if narrowed.key == self.mask.key:
            return []
        pairs = zip(self.mask.attn, narrowed.attn, strict=True)
        lost = [layer for layer, (was, now) in enumerate(pairs) if was and not now]
        self.mask, self.history = narrowed, [*self.history, (self.held, narrowed.key)]
        if not row_masks.is_within(self.served, narrowed):
            self.served = row_masks.intersect(self.served, narrowed)
            self.mask_changes += 1
        return lost

    def lose_layer(self, layer: int) -> RowPages | None:
        """Forget its pages and reservation in `layer` (dropped under it); returns the pages,
        for the pool to take back."""
        self.reserved.pop(layer, None)
        return self.pages.pop(layer, None)

    def put_back(self, now_s: float) -> None:
        """Preempted by recompute: no pages, no mask, nothing cached; its wait starts again."""
        self.pages, self.reserved, self.held, self.mask = {}, {}, 0, None
        self.preemptions += 1
        self.arrived_s = now_s

    def cached(self, tokens: int) -> None:
        """`tokens` more of its tokens are in the KV cache (a step ran them)."""
        self.held += tokens

    def note_outbox(self, full: bool, now_s: float) -> None:
        """Since when its client has left the outbox full (None once it reads)."""
        if not full:
            self.stalled_s = None
        elif self.stalled_s is None:
            self.stalled_s = now_s


def done_event(row: Row, reason: FinishReason, counted: int = 0) -> DoneEvent:
    """The row's last event when it ends well: why, its tokens, the mask it was served under."""
    event: DoneEvent = {
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


def busy_event(retry_after_s: int, why: str, code: str = "waited_out") -> ErrorEvent:
    """A 503 for a request that waited `max_wait_s` and could not start or resume. Its code:
    `waited_out` (the router does not make it wait as long again elsewhere), or
    `budget_below_floor` (the replica's budget holds no room for it above the quality floor)."""
    return error_event(503, f"the replica is busy: {why}", code, retry_after_s)


def waited_out_event(
    row: Row, kept: float, need_pages: int, capacity_pages: int, config: WaitConfig
) -> ErrorEvent:
    """The 503 of a row that waited `max_wait_s`, with a code naming why: it asked for more
    blocks than the replica keeps (`waited_out`), its reservation (`need_pages` in the layer
    that needs most) exceeds the whole pool — the budget holds no room for it under the
    smallest mask the quality floor allows (`budget_below_floor`) — or pages did not come free
    (`waited_out`)."""
    wait, retry = config.max_wait_s, config.retry_after_s
    if row.request.min_kept_fraction > kept:
        asked = row.request.min_kept_fraction
        why = (
            f"the replica serves a mask keeping {kept:.1%} of the blocks, below the request's "
            f"min_kept_fraction {asked:.1%}, and did not grow in {wait} s"
        )
        return busy_event(retry, why)
    if need_pages > capacity_pages:
        why = (
            f"its memory budget holds {capacity_pages} KV pages per layer under the smallest "
            f"mask its quality floor allows, the request needs {need_pages}, and memory did "
            f"not return in {wait} s"
        )
        return busy_event(retry, why, code="budget_below_floor")
    return busy_event(retry, f"no KV pages (memory) came free in {wait} s")


def too_big_event(need: dict[int, int], pool: PagePool, retry_after_s: int) -> ErrorEvent:
    """A 503 for a new request whose reservation exceeds the whole pool, at once (the router
    tries the other replica): `budget_below_floor` when the budget leaves no pages at all,
    else `insufficient_memory`."""
    most = max(need.values())
    code = "budget_below_floor" if pool.capacity == 0 else "insufficient_memory"
    message = (
        f"not enough memory: the request needs {most} KV pages of {pool.page_tokens} tokens "
        f"per layer; the replica's pool has {pool.capacity}"
    )
    return error_event(503, message, code, retry_after_s)


def expired_event(generated: int) -> ErrorEvent:
    """A 504 for a row whose deadline passed, waiting or running."""
    return error_event(504, f"the request's deadline passed after {generated} generated tokens")


def failed_event(what: str, exc: BaseException) -> ErrorEvent:
    """A 500 for a row whose work failed (`what`), naming the exception."""
    return error_event(500, f"{what}: {type(exc).__name__}: {exc}", "generation_failed")


def stalled_event(client_stall_s: float, generated: int) -> ErrorEvent:
    """The error a row gets when its client read nothing for `client_stall_s` while its
    outbox was full (`rap.serving.outbox`)."""
    message = (
        f"the client read no event for {client_stall_s} s while {generated} tokens waited for "
        "it; the request was cancelled (read the stream faster, or raise engine.client_stall_s)"
    )
    return error_event(408, message, "client_stalled")
