"""Plans, budgets and ceilings reach the engine as messages (rap.serving.control): applied on
the engine's thread at a step boundary, idle or not, each answered through its future."""

from __future__ import annotations

import asyncio
import time

import pytest

import rap
from rap.core import memory
from rap.core.masks import MaskVersion
from rap.serving.control import EngineBusyError, answer, answered
from rap.serving.engine import Engine
from rap.serving.messages import MaskPlan
from rap.serving.rows import Request
from tests.serving.engine_driver import CONFIG, SteppedEngine, turn
from tests.serving.test_engine import keep_first, roomy
from tests.tiny import FnPlanner

PLAN = MaskPlan(replica="r", version=MaskVersion(epoch=1))


def test_an_idle_engine_applies_a_budget_on_its_next_loop_iteration(served_dir) -> None:
    """No request is sent: the budget's message wakes the loop, which answers it and switches
    the mask and the pool under the new budget at that same boundary."""
    model = rap.load_model(str(served_dir), device="cpu")
    small = keep_first(model, 2, 2)
    engine = Engine(model, CONFIG, roomy(model), FnPlanner(lambda b, B, S: small))
    time.sleep(0.2)  # the loop is asleep: nothing runs, nothing is pending
    pages = engine.scheduler.pool.capacity
    budget = memory.weight_bytes(model.config, small, model.dtype) + 200_000
    assert answer(engine.set_budget(budget), "the budget", timeout_s=5.0) == budget
    deadline = time.monotonic() + 5.0
    while model.mask.key != small.key and time.monotonic() < deadline:
        time.sleep(0.01)
    assert model.mask.key == small.key and engine.scheduler.pool.capacity != pages
    assert engine.scheduler.idle and engine.error is None


def test_messages_wait_for_the_step_boundary_and_apply_in_order(served_dir) -> None:
    """The caller's thread changes nothing: the engine's budget, plan and ceiling stay as they
    were until the engine's next boundary, which applies them oldest first."""
    model = rap.load_model(str(served_dir), device="cpu")
    engine = SteppedEngine(model, CONFIG, roomy(model), None)
    before = engine.budget_bytes
    first = engine.set_budget(before // 2)
    second = engine.set_budget(before // 3)
    plan = engine.set_plan(PLAN)
    ceiling = engine.set_ceiling(keep_first(model, 4, 3, source="user"))
    assert not any(f.done() for f in (first, second, plan, ceiling))
    assert engine.budget_bytes == before and engine.plan is None and engine.ceiling is None
    turn(engine)
    assert (first.result(0), second.result(0), plan.result(0)) == (before // 2, before // 3, True)
    assert engine.budget_bytes == before // 3 and ceiling.result(0) == engine.ceiling
    assert engine.plan is not None and engine.requested_budget_bytes == before // 3


def test_a_message_not_applied_in_time_is_a_clear_error_and_still_applies(served_dir) -> None:
    """A caller that gives up hears why (the loop did not reach a boundary), and the message
    stays queued: the next boundary applies it."""
    model = rap.load_model(str(served_dir), device="cpu")
    engine = SteppedEngine(model, CONFIG, roomy(model), None)  # no loop runs until `turn`
    budget = engine.budget_bytes // 2
    with pytest.raises(EngineBusyError, match=r"did not apply the budget within 0\.05 s"):
        answer(engine.set_budget(budget), "the budget", timeout_s=0.05)

    offered = engine.set_plan(PLAN)

    async def waited() -> None:
        await answered(offered, "the plan", timeout_s=0.05)

    started = time.monotonic()
    with pytest.raises(EngineBusyError, match=r"did not apply the plan within 0\.05 s"):
        asyncio.run(waited())
    assert time.monotonic() - started < 1.0
    turn(engine)
    assert engine.budget_bytes == budget and engine.plan is PLAN
    assert offered.result(0) is True  # giving up did not cancel the answer


def test_an_error_applying_a_message_reaches_its_sender_and_the_loop_goes_on(
    served_dir, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = rap.load_model(str(served_dir), device="cpu")
    engine = SteppedEngine(model, CONFIG, roomy(model), None)

    def broken(ceiling: object) -> None:
        raise RuntimeError("ceiling bug")

    monkeypatch.setattr(engine, "_take_ceiling", broken)
    failed = engine.set_ceiling(None)
    followed = engine.set_budget(engine.budget_bytes // 2)
    turn(engine)
    with pytest.raises(RuntimeError, match="ceiling bug"):
        answer(failed, "the ceiling", timeout_s=0)
    assert answer(followed, "the budget", timeout_s=0) == engine.budget_bytes


def test_every_step_comes_after_the_messages_and_the_switch(served_dir) -> None:
    """The loop's order, seen from the real engine thread: drain the control queue, then the
    switch, then a scheduler step; nothing steps without both before it."""
    model = rap.load_model(str(served_dir), device="cpu")
    engine = Engine(model, CONFIG, roomy(model), None)
    calls: list[str] = []

    def recorded(name: str, fn):  # type: ignore[no-untyped-def]
        def call(*a, **kw):  # type: ignore[no-untyped-def]
            calls.append(name)
            return fn(*a, **kw)

        return call

    engine._apply_controls = recorded("controls", engine._apply_controls)  # type: ignore[method-assign]
    engine.switcher.apply = recorded("switch", engine.switcher.apply)  # type: ignore[method-assign]
    engine.scheduler.step = recorded("step", engine.scheduler.step)  # type: ignore[method-assign]

    async def main() -> list[dict]:
        engine.set_budget(engine.budget_bytes)
        return [e async for e in engine.submit(Request([5, 6, 7], 6, ignore_eos=True))]

    events = asyncio.run(main())
    assert events[-1]["type"] == "done"
    steps = [i for i, name in enumerate(calls) if name == "step"]
    assert steps, calls
    assert all(calls[i - 2 : i] == ["controls", "switch"] for i in steps), calls
