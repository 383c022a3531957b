"""The GPU run's wall-clock budgets, and the dry run's lack of them.

A GPU run is paid by the second: each part gets a share of `--budget-s` and stops taking new
points when its share is spent, so that a slow part cannot eat the next one's time. A dry run
(the toy model on a CPU) does a fixed small amount of work and must finish it however slow the
machine is (a CI machine at load 12 ran out of a 40 s budget and reported `partial (time)`): it
has no budget (`Budget(None)`), and its deadlines never pass. The clock is injected so that the
rules are tested with a fake one.
"""

from __future__ import annotations

import time
from collections.abc import Callable

Clock = Callable[[], float]


class Deadline:
    """When one part stops taking new points: `end_s` on `clock`, or never (`end_s` None)."""

    def __init__(self, end_s: float | None, clock: Clock = time.monotonic) -> None:
        self.end_s, self.clock = end_s, clock

    def passed(self) -> bool:
        return self.end_s is not None and self.clock() > self.end_s


class Budget:
    """`seconds` shared between parts in proportion to their shares (`total_share` in all);
    each part's share starts when the part does. `seconds` None: no budget (a dry run)."""

    def __init__(
        self, seconds: float | None, total_share: float = 1.0, clock: Clock = time.monotonic
    ) -> None:
        if seconds is not None and seconds <= 0:
            raise ValueError(f"a budget of {seconds} s: expected a positive number of seconds")
        if total_share <= 0:
            raise ValueError(f"parts' shares sum to {total_share}: expected a positive sum")
        self.seconds, self.total_share, self.clock = seconds, total_share, clock

    def deadline(self, share: float) -> Deadline:
        """The deadline of a part that starts now and may use `share` of the budget."""
        if self.seconds is None:
            return Deadline(None, self.clock)
        return Deadline(self.clock() + self.seconds * share / self.total_share, self.clock)


def hold(
    seconds: float,
    tick: Callable[[], None],
    ready: Callable[[], bool] | None = None,
    clock: Clock = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Wait at least `seconds`, then until `ready()` (if given) holds, calling `tick` about
    once a second (a cut-off run keeps what it had). A dry run's phases pass `ready`: they end
    on what happened (a request answered, a budget moved), not on the clock alone."""
    end = clock() + seconds
    while True:
        left = end - clock()
        if left <= 0 and (ready is None or ready()):
            return
        sleep(min(1.0, left) if left > 0 else 0.5)
        tick()
