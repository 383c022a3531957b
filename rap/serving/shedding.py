"""Load shedding: a request whose start the queue predicts too far away is refused at once.

Without it, a burst above capacity queues until each row has waited `max_wait_s`: the queue
then holds that many seconds of work, and it drains only at the capacity the base load leaves
spare (at a base load of ρ × capacity, a backlog of W seconds of work takes W / (1 − ρ) seconds
to drain, and every request meanwhile waits behind it). Refusing a request whose predicted wait
exceeds `shed_wait_s` bounds the backlog to that many seconds; the client hears at once (a 503
`overloaded` with Retry-After, which the router tries on the other replica) instead of after
`max_wait_s`.

The prediction is the queue's own drain rate: rows that left the queue to start, per second,
counted only over steps that began with rows waiting (while nobody waits, admissions follow
arrivals, not capacity), decayed with a half-life of `HALF_LIFE_S` seconds of such time. A new
row at position k (k rows ahead of it) is predicted to start in (k + 1) / rate seconds. Until
`MIN_STARTS` starts have been counted the rate is unknown and nothing is shed. A row is judged
once, in the first step after it arrives; a row already queued keeps its place (it still ends
at `max_wait_s` if memory does not come).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from rap.serving.events import ErrorEvent, error_event

HALF_LIFE_S = 30.0
"""Seconds of backlogged time after which an observation weighs half: long enough to span a
few rows' service, short enough to follow a mask change that slows every step."""
MIN_STARTS = 4.0
"""Weighted starts below which the drain rate is unknown (a cold replica sheds nothing)."""


@dataclass
class DrainRate:
    """Rows per second that leave a backlogged queue to start (module doc)."""

    starts: float = 0.0
    """Decayed count of rows started during backlogged intervals."""
    backlogged_s: float = 0.0
    """Decayed seconds of intervals that began with rows waiting."""

    def observe(self, interval_s: float, started: int) -> None:
        """One interval between admissions that began with rows waiting: `started` rows began."""
        if interval_s <= 0:
            return
        decay = 0.5 ** (interval_s / HALF_LIFE_S)
        self.starts = self.starts * decay + started
        self.backlogged_s = self.backlogged_s * decay + interval_s

    def rows_per_s(self) -> float | None:
        """The drain rate, or None while too few starts were seen to know it."""
        if self.starts < MIN_STARTS or self.backlogged_s <= 0:
            return None
        return self.starts / self.backlogged_s

    def predicted_wait_s(self, ahead_rows: int) -> float | None:
        """Seconds until a row with `ahead_rows` rows ahead of it starts (None: unknown)."""
        rate = self.rows_per_s()
        return None if rate is None else (ahead_rows + 1) / rate


def overloaded_event(predicted_s: float, shed_wait_s: float, retry_after_s: int) -> ErrorEvent:
    """The 503 of a request refused on arrival: its predicted wait, and a Retry-After of about
    that long (the queue ahead of it will have drained by then), never below `retry_after_s`."""
    message = (
        f"the replica is overloaded: the queue ahead predicts a start in {predicted_s:.1f} s, "
        f"more than engine.shed_wait_s = {shed_wait_s:g} s; retry later"
    )
    retry = max(retry_after_s, math.ceil(min(predicted_s, 60.0)))
    return error_event(503, message, "overloaded", retry)


class Queued(Protocol):
    """What the shedder reads of a waiting row."""

    @property
    def id(self) -> int: ...
    @property
    def preemptions(self) -> int: ...


R = TypeVar("R", bound=Queued)


@dataclass
class Shedder:
    """Judges each new waiting row once, against the drain rate it measures (module doc). It
    only says which rows to refuse: the scheduler owns the queue and takes them out."""

    shed_wait_s: float | None
    """Longest predicted wait a new row is queued for; None: nothing is shed."""
    retry_after_s: int
    """The shortest Retry-After a refusal names."""
    drain: DrainRate = field(default_factory=DrainRate)
    judged_id: int = 0
    """Rows up to this id have been judged."""
    admitted_s: float = field(default_factory=time.monotonic)
    """When admission last ran."""
    backlogged: bool = False
    """Whether rows waited after admission last ran."""

    def judge(
        self, now_s: float, started: int, waiting: Sequence[R], last_id: int
    ) -> list[tuple[R, ErrorEvent]]:
        """After an admission that started `started` rows, with `waiting` the queue in order
        and `last_id` the newest row's id: the new rows to refuse, each with its 503."""
        if self.backlogged:
            self.drain.observe(now_s - self.admitted_s, started)
        self.admitted_s, refused, ahead = now_s, [], 0
        for row in waiting:
            if row.id > self.judged_id and not row.preemptions and self.shed_wait_s is not None:
                wait_s = self.drain.predicted_wait_s(ahead)
                if wait_s is not None and wait_s > self.shed_wait_s:
                    refused.append(
                        (row, overloaded_event(wait_s, self.shed_wait_s, self.retry_after_s))
                    )
                    continue
            ahead += 1
        self.judged_id, self.backlogged = last_id, ahead > 0
        return refused
