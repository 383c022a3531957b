"""What operators and controllers do to a running engine: pushed masks (a ceiling), plan versions
across a controller restart, relabelled plans that need no drain, and request deadlines."""

from __future__ import annotations

import asyncio
import itertools
import time

import pytest

import rap
from rap.core.errors import BudgetError
from rap.core.masks import KeepMask, MaskVersion
from rap.serving.control import answer
from rap.serving.controller import Controller
from rap.serving.engine import Engine
from rap.serving.messages import DeviceMemory, MaskPlan, PlanEntry
from rap.serving.rows import Request
from rap.serving.telemetry import snapshot
from tests.serving.test_engine import CONFIG, keep_first, roomy, run
from tests.tiny import FnPlanner


def plan_of(mask: KeepMask, version: MaskVersion, budget: int | None = None) -> MaskPlan:
    mask = mask.model_copy(update={"version": version})
    entry = PlanEntry(max_batch=64, max_seq=4096, mask=mask)
    return MaskPlan(replica="r", version=version, budget_bytes=budget, entries=[entry])


def device(engine: Engine) -> DeviceMemory:
    return DeviceMemory(kind="cpu", total_bytes=1, used_bytes=0, free_bytes=1)


def test_a_pushed_mask_is_a_ceiling_that_plans_do_not_override(served_dir) -> None:
    """It was replaced by the next plan within one telemetry period."""
    model = rap.load_model(str(served_dir), device="cpu")
    engine = Engine(model, CONFIG, roomy(model), None)
    pushed = keep_first(model, 3, 4, source="user")
    engine.set_ceiling(pushed)
    run(engine, [[5, 6, 7]])
    assert model.mask.key == pushed.key
    dense = model.dense_mask().model_copy(update={"source": "controller:rap"})
    assert answer(engine.set_plan(plan_of(dense, MaskVersion(epoch=1, seq=1))), "the next plan")
    run(engine, [[5, 6, 7]])
    assert model.mask.key == pushed.key  # still the operator's
    tel = snapshot("r", engine, device(engine), 0.0)
    assert tel.mask_ceiling == pushed.key
    engine.set_ceiling(None)  # released: the plan alone decides
    run(engine, [[5, 6, 7]])
    assert model.mask.kept_fraction == 1.0


def test_under_a_ceiling_the_budget_still_wins(served_dir) -> None:
    model = rap.load_model(str(served_dir), device="cpu")
    small = keep_first(model, 2, 2, source="local")
    engine = Engine(model, CONFIG, roomy(model), FnPlanner(lambda b, B, S: small))
    engine.set_ceiling(keep_first(model, 4, 3, source="user"))
    engine.set_budget(model.weight_bytes() // 2)  # below the ceiling's weights
    run(engine, [[5, 6, 7]])
    assert sum(model.mask.attn) <= 2 and sum(model.mask.mlp) <= 2
    assert all(not k for k in model.mask.mlp[3:])  # nothing the ceiling drops came back


def test_a_pushed_mask_below_the_floor_is_refused(served_dir) -> None:
    """It was accepted with 200 and never used."""
    model = rap.load_model(str(served_dir), device="cpu")
    config = CONFIG.model_copy(update={"min_kept_fraction": 0.75})
    engine = Engine(model, config, roomy(model), None)
    with pytest.raises(BudgetError, match=r"below the replica's quality floor of 75\.0%"):
        engine.set_ceiling(keep_first(model, 1, 1, source="user"))
    assert engine.ceiling is None


def test_telemetry_reports_the_plan_version_and_a_restarted_controller_gets_through(
    served_dir,
) -> None:
    """Telemetry reported the model's mask version, so a restarted controller took an epoch
    the replica already held, its plans were refused, and the replica was never re-planned."""
    model = rap.load_model(str(served_dir), device="cpu")
    engine = Engine(model, CONFIG, roomy(model), None)
    held = MaskVersion(epoch=2, seq=7)
    engine.plan = plan_of(model.dense_mask(), held)  # taken, not yet run under
    tel = snapshot("r", engine, device(engine), 0.0)
    assert tel.mask_version == held
    dense = model.dense_mask().model_copy(update={"source": "controller:heuristic"})
    fresh = Controller(planner=FnPlanner(lambda b, B, S: dense))
    plan = fresh.report(tel.model_copy(update={"timestamp_s": time.time()}))
    assert plan is not None and held < plan.version
    assert answer(engine.set_plan(plan), "the plan")


def test_a_new_plan_with_the_same_blocks_needs_no_drain(served_dir) -> None:
    """A new version of the same mask relabels it at once: admissions never pause for it."""
    model = rap.load_model(str(served_dir), device="cpu")
    engine = Engine(model, CONFIG, roomy(model), None)
    run(engine, [[5, 6, 7]])
    switches = engine.stats.switches
    dense = model.dense_mask().model_copy(update={"source": "controller:rap"})
    engine.set_plan(plan_of(dense, MaskVersion(epoch=1, seq=1)))
    run(engine, [[5, 6, 7]])
    assert model.mask.version == MaskVersion(epoch=1, seq=1)
    assert engine.stats.switches == switches  # relabelled, the pool kept


def test_a_request_past_its_deadline_ends_and_frees_its_pages(served_dir) -> None:
    model = rap.load_model(str(served_dir), device="cpu")
    engine = Engine(model, CONFIG, roomy(model), None)

    async def main() -> list[dict]:
        deadline = time.monotonic() + 0.3
        request = Request([5, 6, 7], 200, deadline_s=deadline)
        return [e async for e in engine.submit(request)]

    events = asyncio.run(main())
    assert events[-1]["type"] == "error" and events[-1]["status"] == 504
    assert "deadline passed" in events[-1]["message"]
    assert engine.scheduler.idle and engine.scheduler.pool.used_pages() == 0
    assert engine.tokens < 200


def test_a_request_that_asks_for_the_dense_model_waits_and_others_overtake(served_dir) -> None:
    """min_kept_fraction: queued, not served below it; 503 saying why after max_wait_s."""
    model = rap.load_model(str(served_dir), device="cpu")
    config = CONFIG.model_copy(update={"max_wait_s": 1.0})
    engine = Engine(model, config, roomy(model), None)
    engine.set_ceiling(keep_first(model, 3, 4, source="user"))

    async def main() -> tuple[list[dict], list[dict]]:
        picky = Request([5, 6, 7], 4, min_kept_fraction=1.0)
        easy = Request([8, 9], 4)
        a, b = await asyncio.gather(_collect(engine.submit(picky)), _collect(engine.submit(easy)))
        return a, b

    picky, easy = asyncio.run(main())
    assert easy[-1]["type"] == "done"
    assert picky[-1]["status"] == 503 and "min_kept_fraction 100.0%" in picky[-1]["message"]
    engine.set_ceiling(None)

    async def again() -> list[dict]:
        return await _collect(engine.submit(Request([5, 6, 7], 4, min_kept_fraction=1.0)))

    done = asyncio.run(again())[-1]
    assert done["type"] == "done" and "keep1.000" in done["fingerprint"]


def test_a_shrink_below_a_running_rows_floor_preempts_it_instead(served_dir) -> None:
    model = rap.load_model(str(served_dir), device="cpu")
    engine = Engine(model, CONFIG, roomy(model), None)

    async def main() -> list[dict]:
        events = []
        request = Request([5, 6, 7], 40, ignore_eos=True, min_kept_fraction=0.9)
        async for event in engine.submit(request):
            events.append(event)
            if len(events) == 3:
                engine.set_ceiling(keep_first(model, 3, 4, source="user"))  # keeps 7 of 8
                # memory back a little later: the preempted row resumes
                asyncio.get_running_loop().call_later(0.5, engine.set_ceiling, None)
        return events

    events = asyncio.run(main())
    assert engine.scheduler.stats.preempted == 1
    assert events[-1]["type"] == "done" and events[-1]["completion_tokens"] == 40


def test_grows_wait_for_the_budget_to_hold_and_incomparable_masks_wait_for_idle(
    served_dir,
) -> None:
    """Hysteresis: memory must be back for grow_after_s before blocks are restored; a switch
    between masks neither of which holds the other (which would leave running rows with their
    intersection) waits until nothing runs unless the budget forces it."""
    model = rap.load_model(str(served_dir), device="cpu")
    config = CONFIG.model_copy(update={"grow_after_s": 0.5})
    engine = Engine(model, config, roomy(model), None)
    small = keep_first(model, 3, 3, source="user")
    engine.set_ceiling(small)
    run(engine, [[5, 6, 7]])
    assert model.mask.key == small.key  # a shrink: at once
    engine.set_ceiling(None)
    run(engine, [[5, 6, 7]], max_tokens=2)
    assert model.mask.key == small.key  # a grow: not yet
    time.sleep(0.6)
    run(engine, [[5, 6, 7]], max_tokens=2)
    assert model.mask.kept_fraction == 1.0

    other = KeepMask.from_drops(model.model_id, model.num_layers, drop_mlp="0,1")
    engine.set_ceiling(keep_first(model, 4, 2, source="user"))  # drops MLP 2, 3
    run(engine, [[5, 6, 7]], max_tokens=2)

    async def under_load() -> str:
        stream = engine.submit(Request([5, 6, 7], 30, ignore_eos=True))
        await stream.__anext__()
        engine.set_ceiling(other.model_copy(update={"source": "user"}))  # drops MLP 0, 1
        seen = model.mask.key
        async for _ in stream:
            seen = seen if engine.running == 0 else model.mask.key
        return seen

    held = asyncio.run(under_load())
    assert held == keep_first(model, 4, 2).key  # kept while the row ran
    time.sleep(0.6)
    run(engine, [[5, 6, 7]], max_tokens=2)
    assert model.mask.key == other.key  # switched once idle


def test_a_restore_that_copies_slowly_waits_longer_for_the_memory_to_stay(served_dir) -> None:
    """A grow waited `grow_after_s` whatever its copy cost; now it also waits until the budget
    has held for `restore_patience` × its predicted copy time (the last read's rate)."""
    model = rap.load_model(str(served_dir), device="cpu")
    config = CONFIG.model_copy(update={"grow_after_s": 0.0, "restore_patience": 2.0})
    engine = Engine(model, config, roomy(model), None)
    small = keep_first(model, 2, 2, source="user")
    engine.set_ceiling(small)
    run(engine, [[5, 6, 7]])
    dense = model.dense_mask()
    restored = model.predicted_weight_bytes(dense) - model.predicted_weight_bytes(small)
    engine.prefetch.last_bytes, engine.prefetch.last_s = restored // 2, 0.5  # 1 s to read it
    assert engine.prefetch.wait_s(small, dense, 0.0, 2.0) == pytest.approx(2.0, rel=1e-3)
    engine.set_ceiling(None)
    run(engine, [[5, 6, 7]], max_tokens=2)
    assert model.mask.key == small.key  # held for less than 2 × 1 s: not yet
    time.sleep(2.2)
    run(engine, [[5, 6, 7]], max_tokens=2)
    assert model.mask.kept_fraction == 1.0
    assert engine.prefetch.last_bytes == restored  # the real read's rate is the next prediction


async def _collect(stream) -> list[dict]:
    return [e async for e in stream]


def test_sizing_plans_for_the_running_rows_before_one_row(served_dir) -> None:
    """A budget drop under many rows preempted most of them: the candidates held a full batch
    or one row; now one is planned for the running rows' reservations."""
    model = rap.load_model(str(served_dir), device="cpu")
    asked: list[tuple[int, int]] = []
    keep_most = keep_first(model, 4, 3)

    def plan(budget, batch, seq):
        asked.append((batch, seq))
        return keep_most if (batch, seq) == (1, 40 * CONFIG.page_tokens) else None

    engine = Engine(model, CONFIG, roomy(model), None)
    planner = FnPlanner(lambda b, B, S: plan(b, B, S) or keep_first(model, 1, 1))
    budget = engine.sizing.bytes_with(keep_most, 40)
    mask, pages = engine.sizing.choose(budget, None, None, planner, MaskVersion(), held_pages=40)
    assert (1, 40 * CONFIG.page_tokens) in asked
    assert mask.key == keep_most.key and pages >= 40


def test_restores_are_read_beside_the_steps_not_on_them(served_dir) -> None:
    """A grow read its blocks on the engine's thread: every running row stalled meanwhile."""
    model = rap.load_model(str(served_dir), device="cpu")
    engine = Engine(model, CONFIG, roomy(model), None)
    engine.set_ceiling(keep_first(model, 2, 2, source="user"))
    run(engine, [[5, 6, 7]])
    fetch = model.store.fetch

    def slow_fetch(*a):
        time.sleep(0.25)  # a slow disk or a slow host→device copy
        return fetch(*a)

    model.store.fetch = slow_fetch
    step = engine.scheduler.step

    def paced_step() -> None:  # steps of 10 ms: the row outlives the reads
        time.sleep(0.01)
        step()

    engine.scheduler.step = paced_step  # type: ignore[method-assign]

    async def main() -> tuple[list[float], float | None]:
        stamps, grown_at = [], None
        async for _ in engine.submit(Request([5, 6, 7], 250, ignore_eos=True)):
            stamps.append(time.monotonic())
            if len(stamps) == 3:
                engine.set_ceiling(None)  # a grow: 4 blocks to read, 1 s in all
            if grown_at is None and model.mask.kept_fraction == 1.0:
                grown_at = stamps[-1]
        return stamps, grown_at

    stamps, grown_at = asyncio.run(main())
    assert grown_at is not None and grown_at - stamps[2] >= 1.0  # grown while the row ran
    gaps = [b - a for a, b in itertools.pairwise(stamps[3:])]
    assert max(gaps) < 0.5, max(gaps)  # its pace held while the blocks were read (1 s)
    assert engine.prefetch.last_bytes > 0 and engine.prefetch.last_s >= 1.0
    assert model.mask.kept_fraction == 1.0
