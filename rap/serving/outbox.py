"""A request's events on their way from the engine's thread to its client, bounded.

The engine's thread puts events; the client's coroutine gets them on the event loop. A client
that reads slowly must not make the replica hold every token it has not sent, so an outbox
counts the events put and not yet got (`backlog`): at `capacity` it is `full`, and the
scheduler skips the row in its steps (it keeps its pages) until the client catches up; a row
that stays full for `client_stall_s` is cancelled (`rap.serving.scheduler`). A terminal event
(done or error) is always accepted, so that every request gets exactly one, whatever its
backlog.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

from rap.serving.events import StepEvent


class Outbox:
    """One request's bounded event queue between two threads (module doc). It is the row's
    sink: calling it puts an event."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        capacity: int,
        on_drain: Callable[[], None] = lambda: None,
        on_put: Callable[[StepEvent], None] = lambda event: None,
    ) -> None:
        self._loop = loop
        self._queue: asyncio.Queue[StepEvent] = asyncio.Queue()
        self._lock = threading.Lock()
        self._backlog = 0
        self.capacity = capacity
        self._on_drain = on_drain
        """Called (from the event loop) when a full outbox gets room: the engine wakes up."""
        self._on_put = on_put
        """Called on the engine's thread before an event is queued (it may add to the event)."""

    def __call__(self, event: StepEvent) -> None:
        """From the engine's thread: queue `event` for the client."""
        self._on_put(event)
        with self._lock:
            self._backlog += 1
        self._loop.call_soon_threadsafe(self._queue.put_nowait, event)

    @property
    def backlog(self) -> int:
        """Events put and not yet got."""
        with self._lock:
            return self._backlog

    @property
    def full(self) -> bool:
        """Whether the row should wait for its client before it makes more events."""
        return self.backlog >= self.capacity

    async def get(self) -> StepEvent:
        """On the event loop: the next event, waiting for one."""
        event = await self._queue.get()
        with self._lock:
            was_full = self._backlog >= self.capacity
            self._backlog -= 1
            drained = was_full and self._backlog < self.capacity
        if drained:
            self._on_drain()
        return event
