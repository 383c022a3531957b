"""What operators and controllers do to a running engine: pushed masks (a ceiling), plan versions
across a controller restart, relabelled plans that need no drain, and request deadlines."""

from __future__ import annotations

import asyncio
import time

import pytest

import rap
from rap.core.errors import BudgetError
from rap.core.masks import KeepMask, MaskVersion
from rap.serving.controller import Controller
from rap.serving.engine import Engine, GenRequest
from rap.serving.messages import DeviceMemory, MaskPlan, PlanEntry
from rap.serving.telemetry import snapshot
from tests.serving.test_engine import CONFIG, keep_first, roomy, run
from tests.tiny import FnPlanner, save_tiny, save_tokenizer


@pytest.fixture(scope="module")
def served_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("served")
    save_tiny("llama", folder)
    save_tokenizer(folder)
    return folder


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
    assert engine.set_plan(plan_of(dense, MaskVersion(epoch=1, seq=1)))  # the next plan
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
    assert engine.set_plan(plan)


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
        request = GenRequest([5, 6, 7], 200, deadline_s=deadline)
        return [e async for e in engine.submit(request)]

    events = asyncio.run(main())
    assert events[-1]["type"] == "error" and events[-1]["status"] == 504
    assert "deadline passed" in events[-1]["message"]
    assert engine.scheduler.idle and engine.scheduler.pool.used_pages() == 0
    assert engine.tokens < 200
