"""The engine driven from the test thread, one loop turn at a time, with no wall clock deciding
anything: what the pinning tests and the golden trace run on.

`SteppedEngine` is the real `Engine` (sizing, plans, ceilings, the no-thrash rule, switches under
running rows, pool cuts, preemption, admission) except that its own worker thread exits at once;
`turn` then runs what one pass of `Engine._work` runs — the step boundary (the controls sent
since the last turn, then the switch), then one scheduler step — when the test says so. The one
part of a turn that runs in a thread of its own in the engine, a grow's restore read
(`rap.serving.restores`), is awaited inside the turn that started it, so a grow binds at that
same boundary (in the engine it binds at the first boundary after the read ends).
Configurations for these tests set `grow_after_s` and `restore_patience` to 0 and `max_wait_s`
far beyond a test's length, so no decision depends on how fast the
machine runs.
"""

from __future__ import annotations

from typing import Any

from rap.serving.engine import Engine, EngineConfig
from rap.serving.rows import Request, Row

CONFIG = EngineConfig(
    page_tokens=4,
    max_step_tokens=8,
    target_seq=32,
    grow_after_s=0,
    restore_patience=0,
    max_wait_s=3600,
)


class SteppedEngine(Engine):
    """An `Engine` whose loop turns are run by the caller (`turn`), not by its thread."""

    def _work(self) -> None:
        return  # the test thread runs the loop body (turn)


def turn(engine: Engine) -> bool:
    """One pass of `Engine._work`: the step boundary (the queued controls, then the switch they
    call for), then a scheduler step if a row waits or runs. Returns whether a forward ran."""
    engine._boundary()
    for _ in range(3):  # a restore read began: it binds at this boundary once read
        pending = engine.prefetch._future
        if pending is None:
            break
        pending.result()
        engine._maybe_switch()
    sched = engine.scheduler
    if not sched.running and not sched.waiting:
        return False
    ran = sched.step()
    engine._record_step()
    return ran


def add(engine: Engine, request: Request, sink: Any) -> Row:
    """Queue `request` as `Engine.submit` does (`check`, then the scheduler's queue), with a
    plain sink instead of the asyncio outbox; returns its row."""
    engine.check(request)
    row_id = engine.scheduler.add(request, sink)
    return next(r for r in engine.scheduler.waiting if r.id == row_id)


def run_out(engine: Engine, limit: int = 400) -> int:
    """Turns until nothing waits or runs; returns how many."""
    turns = 0
    while not engine.scheduler.idle:
        assert turns < limit, "the engine did not finish"
        turn(engine)
        turns += 1
    return turns
