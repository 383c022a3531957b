"""The replica's engine without Ray: streams, budgets and masks, cancellation, a loop that
survives (rap.serving.engine, over rap.serving.scheduler)."""

from __future__ import annotations

import asyncio
import time

import pytest

import rap
from rap.core import memory
from rap.core.masks import KeepMask, MaskVersion
from rap.serving.control import answer
from rap.serving.engine import Engine, EngineConfig, EngineError
from rap.serving.messages import MaskPlan, PlanEntry
from rap.serving.rows import Request
from tests.tiny import FnPlanner

PROMPTS = [[5, 9, 14], [7, 8, 9, 10, 11, 12, 13, 20, 21], [30], [40, 41, 42, 43, 44, 45]]
CONFIG = EngineConfig(page_tokens=4, max_step_tokens=8, target_seq=64, grow_after_s=0)


def keep_first(model, attn: int, mlp: int, **kw) -> KeepMask:
    """A mask keeping the first `attn` attention and `mlp` MLP blocks."""
    n = model.num_layers
    return KeepMask(
        model=model.model_id,
        attn=tuple(i < attn for i in range(n)),
        mlp=tuple(i < mlp for i in range(n)),
        **kw,
    )


async def collect(engine: Engine, prompt: list[int], max_tokens: int = 10) -> list[dict]:
    return [e async for e in engine.submit(Request(prompt, max_tokens))]


def run(engine: Engine, prompts, max_tokens: int = 10) -> list[list[dict]]:
    async def main():
        return await asyncio.gather(*(collect(engine, p, max_tokens) for p in prompts))

    return asyncio.run(main())


def roomy(model) -> int:
    """A budget that holds the dense model and a pool for the whole batch."""
    return 4 * memory.weight_bytes(model.config, model.dense_mask(), model.dtype) + 10**7


def test_concurrent_requests_stream_what_greedy_generate_gives(served_dir) -> None:
    model = rap.load_model(str(served_dir), device="cpu")
    eos = model.eos_ids()
    rows = [model.generate_ids([p], 10).token_ids[0] for p in PROMPTS]
    want = [
        model.decode([t for t in r[: next((i for i, t in enumerate(r) if t in eos), len(r))]])
        for r in rows
    ]
    engine = Engine(model, CONFIG, roomy(model), None)
    results = run(engine, PROMPTS)
    for events, text in zip(results, want, strict=True):
        assert events[0]["type"] == "start" and events[0]["fingerprint"].startswith("rap-")
        assert events[-1]["type"] == "done"
        streamed = "".join(e["text"] for e in events if e["type"] == "token")
        assert streamed == text
    assert engine.scheduler.stats.forwards < sum(len(p) for p in PROMPTS) + 40  # shared steps


def test_a_consumer_that_stops_cancels_its_request_and_frees_its_pages(served_dir) -> None:
    """What Serve does when a client hangs up: the generator is closed at its next await."""
    model = rap.load_model(str(served_dir), device="cpu")
    engine = Engine(model, CONFIG, roomy(model), None)

    async def main():
        stream = engine.submit(Request([5, 6, 7], 200))
        assert (await stream.__anext__())["type"] == "start"
        await stream.__anext__()  # a token
        await stream.aclose()  # the client is gone
        for _ in range(100):
            if engine.scheduler.idle:
                break
            await asyncio.sleep(0.02)

    asyncio.run(main())
    assert engine.scheduler.idle and engine.scheduler.pool.used_pages() == 0
    assert engine.tokens < 200


def test_a_budget_drop_pauses_admissions_then_switches_without_overshooting(served_dir) -> None:
    model = rap.load_model(str(served_dir), device="cpu")
    small = keep_first(model, 4, 2, source="controller:rap", version=MaskVersion(epoch=1))
    engine = Engine(model, CONFIG, roomy(model), FnPlanner(lambda b, B, S: small))
    assert model.mask.kept_fraction == 1.0
    budget = memory.weight_bytes(model.config, small, model.dtype) + 200_000
    plan = MaskPlan(
        replica="r",
        version=MaskVersion(epoch=1),
        budget_bytes=budget,
        entries=[PlanEntry(max_batch=64, max_seq=4096, mask=small)],
    )
    assert answer(engine.set_plan(plan), "the plan")
    older = MaskPlan(replica="r", version=MaskVersion(epoch=0, seq=9))
    assert not answer(engine.set_plan(older), "the older plan")
    (events,) = run(engine, [[5, 6, 7]])
    assert model.mask == small and "controller:rap" in events[0]["fingerprint"]
    own = model.weight_bytes() + engine.kv_bytes_held()
    assert own <= engine.budget_bytes and engine.stats.over_budget_bytes <= 0
    assert engine.stats.steps_on_controller_mask == engine.stats.steps > 0


def test_below_the_floor_nothing_runs_and_requests_get_503_with_the_reason(served_dir) -> None:
    model = rap.load_model(str(served_dir), device="cpu")
    config = CONFIG.model_copy(update={"min_kept_fraction": 0.75})
    tiny_budget = memory.weight_bytes(model.config, keep_first(model, 1, 0), model.dtype)
    engine = Engine(model, config, tiny_budget, FnPlanner(lambda b, B, S: keep_first(model, 1, 0)))
    (events,) = run(engine, [[5, 6, 7]])
    assert events[-1]["type"] == "error" and events[-1]["status"] == 503
    assert "not enough memory" in events[-1]["message"] and events[-1]["retry_after"] == 2
    assert model.mask.kept_fraction >= 0.75


def test_a_planner_error_keeps_the_loop_and_the_mask(served_dir) -> None:
    model = rap.load_model(str(served_dir), device="cpu")

    def broken(b, B, S):
        raise RuntimeError("planner bug")

    engine = Engine(model, CONFIG, roomy(model), None)
    engine.planner = FnPlanner(broken)
    answer(engine.set_budget(roomy(model) // 2), "the budget")  # re-plans: the planner raises
    assert engine.stats.planner_errors == 1
    (events,) = run(engine, [[5, 6, 7]])
    assert events[-1]["type"] == "done" and engine.error is None


def test_context_and_a_full_queue_are_refused_before_queueing(served_dir) -> None:
    model = rap.load_model(str(served_dir), device="cpu")
    engine = Engine(model, CONFIG.model_copy(update={"max_waiting": 1}), roomy(model), None)
    with pytest.raises(EngineError, match="exceeds the model's context of 256") as exc:
        engine.check(Request([5] * 250, 10))
    assert exc.value.status == 400
    engine.scheduler.admitting = False  # hold the queue still
    engine.scheduler.add(engine_request := _request([5, 6]), lambda e: None)
    with pytest.raises(EngineError, match="queue is full") as exc:
        engine.check(Request([5, 6], 4))
    assert exc.value.status == 503 and exc.value.reason == "queue_full"
    assert engine_request.max_tokens == 4


def _request(prompt: list[int]):
    from rap.serving.scheduler import Request

    return Request(prompt, 4)


def test_steps_run_off_the_event_loop(served_dir) -> None:
    """While a long request decodes, the event loop keeps ticking."""
    model = rap.load_model(str(served_dir), device="cpu")
    engine = Engine(model, CONFIG, roomy(model), None)
    ticks = 0

    async def ticker():
        nonlocal ticks
        end = time.monotonic() + 0.3
        while time.monotonic() < end:
            ticks += 1
            await asyncio.sleep(0.01)

    async def main():
        await asyncio.gather(collect(engine, [5, 6, 7], 60), ticker())

    asyncio.run(main())
    assert ticks >= 15


def test_a_replica_that_does_not_follow_its_budget_stays_as_sized(served_dir) -> None:
    """`follow_budget: false` (the dense-high / dense-low baselines): a budget drop, from an
    operator or a plan, is recorded and changes neither the mask nor the pool."""
    model = rap.load_model(str(served_dir), device="cpu")
    small = keep_first(model, 2, 2)
    config = CONFIG.model_copy(update={"follow_budget": False})
    engine = Engine(model, config, roomy(model), FnPlanner(lambda b, B, S: small))
    pages = engine.scheduler.pool.capacity
    engine.set_budget(roomy(model) // 4)
    plan = MaskPlan(replica="r", version=MaskVersion(epoch=1), budget_bytes=roomy(model) // 4)
    engine.set_plan(plan)
    (events,) = run(engine, [[5, 6, 7]])
    assert events[-1]["type"] == "done"
    assert model.mask.kept_fraction == 1.0 and engine.scheduler.pool.capacity == pages
    assert engine.budget_bytes == roomy(model) and engine.requested_budget_bytes < roomy(model)
    follows = Engine(model, CONFIG, roomy(model), FnPlanner(lambda b, B, S: small))
    follows.set_budget(memory.weight_bytes(model.config, small, model.dtype) + 200_000)
    run(follows, [[5, 6, 7]])
    assert model.mask.key == small.key  # the default follows it


def test_a_static_mask_is_the_ceiling_from_the_start_and_after_a_release(served_dir) -> None:
    model = rap.load_model(str(served_dir), device="cpu")
    config = CONFIG.model_copy(update={"static_mask": "a1,m3"})
    engine = Engine(model, config, roomy(model), None)
    (events,) = run(engine, [[5, 6, 7]])
    assert events[-1]["type"] == "done" and model.mask.key == "a1,m3"
    engine.set_ceiling(keep_first(model, 1, 4))  # an operator's mask replaces it...
    released = answer(engine.set_ceiling(None), "the release")  # ...back to the static one
    assert released is not None and released.key == "a1,m3"
    assert engine.ceiling is not None and engine.ceiling.key == "a1,m3"
    with pytest.raises(ValueError, match="static_mask"):
        EngineConfig(static_mask="attn1")
