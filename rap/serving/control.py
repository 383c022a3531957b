"""What other threads ask of the engine: typed messages applied on the engine's thread.

A plan from the controller, an operator's budget or mask ceiling arrive on the event loop's
thread while the engine's thread steps. Applying them there would read the scheduler's rows and
pool while they change (a reservation dict changing in the middle of a sum), so each call only
queues a message here and wakes the engine; the engine drains the queue at the next step
boundary — also when nothing runs: an idle engine waits on its wake-up event, not on a request —
applies the messages in the order they came and resolves each one's future with its answer
(or with the error applying it raised). A caller that needs the answer waits on the future with
a timeout (`answer`, `answered`); one that does not may drop it.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any, TypeVar

from rap.core.errors import RapError
from rap.core.masks import KeepMask
from rap.serving.messages import MaskPlan

T = TypeVar("T")

ANSWER_TIMEOUT_S = 10.0
"""How long a caller waits for the engine to apply its message: a step boundary comes within
one step (milliseconds on a GPU, up to a second on a busy CPU) plus a switch's drops."""


@dataclass(frozen=True)
class SetPlan:
    """The controller's plan; answered with whether it was taken (older versions are not)."""

    plan: MaskPlan


@dataclass(frozen=True)
class SetBudget:
    """An operator's budget in bytes; answered with the budget the engine now follows."""

    budget_bytes: int


@dataclass(frozen=True)
class SetCeiling:
    """An operator's mask ceiling (None releases it); answered with the ceiling now held."""

    ceiling: KeepMask | None


Control = SetPlan | SetBudget | SetCeiling


class EngineBusyError(RapError):
    """The engine did not apply a message within the caller's timeout."""


class ControlQueue:
    """Messages in arrival order, each with the future its sender may wait on."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # each future's value type is its message's answer (bool, int, KeepMask | None)
        self._items: deque[tuple[Control, Future[Any]]] = deque()

    def put(self, message: Control) -> Future[Any]:
        future: Future[Any] = Future()
        with self._lock:
            self._items.append((message, future))
        return future

    def drain(self) -> list[tuple[Control, Future[Any]]]:
        """Every message queued so far, oldest first (the engine's thread takes them all)."""
        with self._lock:
            items, self._items = list(self._items), deque()
        return items

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)


def _busy(what: str, timeout_s: float) -> EngineBusyError:
    return EngineBusyError(
        f"the engine did not apply {what} within {timeout_s:g} s",
        expected="its step loop to reach a step boundary within one step",
        fix="check the replica's health (a dead or stuck step loop shows in /admin/state and "
        "the health check) and send it again",
    )


def answer(future: Future[T], what: str, timeout_s: float = ANSWER_TIMEOUT_S) -> T:
    """The engine's answer to a message, waited for in a thread that is not the engine's; an
    error applying it is raised here."""
    try:
        return future.result(timeout=timeout_s)
    except FutureTimeout:
        raise _busy(what, timeout_s) from None


async def answered(future: Future[T], what: str, timeout_s: float = ANSWER_TIMEOUT_S) -> T:
    """`answer` for a coroutine: the event loop goes on while the engine applies it."""
    try:
        # shielded: a caller that gives up leaves the message to be applied, its future to be set
        return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), timeout_s)
    except TimeoutError:
        raise _busy(what, timeout_s) from None
