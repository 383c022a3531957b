"""The controller's decisions and GPU budget shares, without Ray."""

from __future__ import annotations

import pytest

from rap.core.errors import BudgetError
from rap.core.masks import KeepMask, MaskVersion
from rap.serving.budget import GpuShares, ShareConfig, water_fill
from rap.serving.controller import Controller, ControllerConfig
from rap.serving.messages import DeviceMemory, QueueState, Telemetry
from tests.tiny import FnPlanner

MIB = 2**20


def plan(budget: int, batch: int, seq: int) -> KeepMask:
    """Keeps one MLP block per 10 MiB of budget beyond 40 MiB, per (batch·seq) unit."""
    if budget < 40 * MIB:
        raise BudgetError("too small")
    kept = min(4, (budget - 40 * MIB) // (10 * MIB * max(1, batch * seq // 1024)))
    return KeepMask(
        model="m",
        source="controller:heuristic",
        attn=(True,) * 4,
        mlp=tuple(i < kept for i in range(4)),
    )


planner = FnPlanner(plan)


def tel(name: str = "r0", budget: int = 100 * MIB, t: float = 1000.0, **kw) -> Telemetry:
    fields = {
        "replica": name,
        "timestamp_s": t,
        "budget_bytes": budget,
        "weight_bytes": 60 * MIB,
        "device": DeviceMemory(kind="cpu", total_bytes=budget, used_bytes=0, free_bytes=budget),
    }
    return Telemetry(**{**fields, **kw})


def test_first_report_plans_with_an_epoch_above_what_the_replica_holds() -> None:
    c = Controller(planner)
    plan = c.report(tel(mask_version=MaskVersion(epoch=4, seq=7)), now_s=1000.0)
    assert plan is not None and plan.version.epoch == 5 and plan.version.seq == 1
    assert all(
        e.mask.source == "controller:heuristic" and e.mask.version == plan.version
        for e in plan.entries
    )
    assert "first plan" in plan.reason
    assert c.report(tel(mask_version=plan.version), now_s=1000.5) is None  # nothing changed


def test_budget_change_and_new_buckets_give_new_plans_with_reasons() -> None:
    c = Controller(planner)
    first = c.report(tel(), now_s=1000.0)
    assert first is not None
    smaller = c.report(tel(budget=60 * MIB, mask_version=first.version), now_s=1000.1)
    assert smaller is not None and "budget changed 100.0 → 60.0 MiB" in smaller.reason
    assert smaller.version.seq == first.version.seq + 1
    kept_before = sum(first.entries[0].mask.mlp)
    assert sum(smaller.entries[0].mask.mlp) < kept_before
    busy = tel(
        budget=60 * MIB,
        mask_version=smaller.version,
        queue=QueueState(recent_batch_sizes=[6, 2], recent_longest_seqs=[900, 3000]),
    )
    bigger = c.report(busy, now_s=1000.2)
    assert bigger is not None and "new workload buckets [(4, 4096)]" in bigger.reason
    planned = {(e.max_batch, e.max_seq) for e in bigger.entries}
    assert (4, 4096) in planned and (1, 256) in planned and (8, 1024) in planned
    assert [d.reason for d in c.decisions][-1] == bigger.reason


def test_a_planner_that_does_not_name_itself_is_refused() -> None:
    """Every controller mask says which planner made it (controller:rap, ...)."""
    unnamed = FnPlanner(
        lambda budget, b, s: plan(budget, b, s).model_copy(update={"source": "user"})
    )
    with pytest.raises(ValueError, match="controller:rap"):
        Controller(unnamed).report(tel(), now_s=1000.0)


def test_unplannable_buckets_are_left_out() -> None:
    c = Controller(planner)
    plan = c.report(tel(budget=10 * MIB), now_s=1000.0)
    assert plan is not None and plan.entries == []


def test_stale_telemetry_is_not_planned_on() -> None:
    c = Controller(planner, ControllerConfig(stale_after_s=2.0))
    assert c.report(tel(t=1000.0), now_s=1010.0) is None
    assert c.state(now_s=1010.0)["replicas"]["r0"]["stale"] is True


def test_a_replica_holding_a_newer_epoch_restarts_the_count_above_it() -> None:
    c = Controller(planner)
    first = c.report(tel("r0"), now_s=1000.0)
    assert first is not None and first.version.epoch == 1
    other = c.report(tel("r1", mask_version=MaskVersion(epoch=3, seq=2)), now_s=1000.1)
    assert other is not None and other.version.epoch == 4
    again = c.report(tel("r0", mask_version=first.version), now_s=1000.2)
    assert again is not None and again.version.epoch == 4  # r0 moves to the new epoch too


def gpu_tel(name: str, free: int, own: int, t: float = 1000.0) -> Telemetry:
    return tel(
        name,
        t=t,
        weight_bytes=own,
        budget_from_device=True,
        device=DeviceMemory(
            kind="cuda",
            device_id="GPU-1",
            total_bytes=80 << 30,
            used_bytes=(80 << 30) - free,
            free_bytes=free,
        ),
    )


def test_gpu_shares_split_free_memory_with_hysteresis_and_dwell() -> None:
    shares = GpuShares(ShareConfig(margin_bytes=1 << 30, hysteresis_bytes=64 * MIB, dwell_s=10))
    a = shares.assign([gpu_tel("a", 9 << 30, 2 << 30), gpu_tel("b", 9 << 30, 4 << 30)], 0.0)
    assert a == {"a": 7 << 30, "b": 7 << 30}  # (2 + 4 + 9 − 1) GiB, in equal parts
    small = shares.assign(
        [gpu_tel("a", (9 << 30) + 10 * MIB, 2 << 30), gpu_tel("b", (9 << 30) + 10 * MIB, 4 << 30)],
        1.0,
    )
    assert small == a  # below the hysteresis: unchanged
    down = shares.assign([gpu_tel("a", 3 << 30, 2 << 30), gpu_tel("b", 3 << 30, 4 << 30)], 2.0)
    assert down["a"] == 4 << 30  # decreases apply at once
    up = shares.assign([gpu_tel("a", 9 << 30, 2 << 30), gpu_tel("b", 9 << 30, 4 << 30)], 5.0)
    assert up == down  # a rise within the dwell time waits
    later = shares.assign([gpu_tel("a", 9 << 30, 2 << 30), gpu_tel("b", 9 << 30, 4 << 30)], 13.0)
    assert later == a


def test_a_tenant_that_takes_the_margin_makes_every_replica_give_its_part_back() -> None:
    """Free memory below the margin lowers what the replicas may hold together (the H100
    run: with the deficit clamped at 0 no budget moved and the co-tenant's next step
    failed); replicas that started at different sizes get equal parts (that run: 47.5 GB
    against 8–13 GB throughout)."""
    shares = GpuShares(ShareConfig(margin_bytes=8 << 30, hysteresis_bytes=64 * MIB, dwell_s=10))
    first = shares.assign([gpu_tel("a", 10 << 30, 40 << 30), gpu_tel("b", 10 << 30, 10 << 30)], 0)
    assert first == {"a": 26 << 30, "b": 26 << 30}  # (40 + 10 + 10 − 8) / 2
    taken = shares.assign([gpu_tel("a", 2 << 30, 26 << 30), gpu_tel("b", 2 << 30, 26 << 30)], 1)
    assert taken == {"a": 23 << 30, "b": 23 << 30}  # 6 GiB short: 3 GiB each, at once
    empty = shares.assign([gpu_tel("a", 0, 1 << 30), gpu_tel("b", 0, 1 << 30)], 2)
    assert empty == {"a": 0, "b": 0}  # never negative


def test_a_replica_never_gets_more_than_it_can_use_and_the_rest_goes_to_the_others() -> None:
    shares = GpuShares(ShareConfig(margin_bytes=8 << 30, hysteresis_bytes=64 * MIB, dwell_s=10))
    small = gpu_tel("a", 10 << 30, 10 << 30).model_copy(update={"want_bytes": 12 << 30})
    got = shares.assign([small, gpu_tel("b", 10 << 30, 40 << 30)], 0)
    assert got == {"a": 12 << 30, "b": 40 << 30}  # 52 GiB: a wants 12, b takes the other 40
    assert water_fill(30, {"x": 5, "y": 50, "z": None}) == {"x": 5, "y": 12, "z": 13}
    assert water_fill(30, {"x": 5, "y": 6}) == {"x": 5, "y": 6}  # the rest stays free


def test_controller_assigns_device_budgets_in_plans() -> None:
    c = Controller(planner, ControllerConfig(shares=ShareConfig(margin_bytes=0)))
    c.report(gpu_tel("a", 200 * MIB, 60 * MIB), now_s=1000.0)
    plan = c.report(gpu_tel("b", 200 * MIB, 60 * MIB), now_s=1000.0)
    assert plan is not None and plan.budget_bytes == 60 * MIB + 100 * MIB


@pytest.mark.parametrize("bad", [{"budget_bytes": -1}, {"replica": 3}, {"extra": 1}])
def test_malformed_telemetry_is_rejected(bad) -> None:
    from pydantic import ValidationError

    data = tel().model_dump(mode="json") | bad
    with pytest.raises(ValidationError):
        Telemetry.model_validate(data)


def test_buckets_nothing_fits_are_not_replanned_every_report() -> None:
    def small_only(budget: int, batch: int, seq: int) -> KeepMask:
        if batch * seq > 8 * 2048:
            raise BudgetError("too big")
        return plan(budget, batch, seq)

    c = Controller(FnPlanner(small_only))
    big = QueueState(recent_batch_sizes=[8], recent_longest_seqs=[4000])
    first = c.report(tel(budget=50 * MIB, queue=big), now_s=1000.0)
    assert first is not None
    assert (8, 4096) not in {(e.max_batch, e.max_seq) for e in first.entries}
    assert c.report(tel(budget=50 * MIB, queue=big, mask_version=first.version), 1000.3) is None


def test_the_decision_log_keeps_the_configured_history() -> None:
    c = Controller(planner, ControllerConfig(history=2))
    for i in range(4):
        c.report(tel(budget=(100 + i) * MIB), now_s=1000.0 + i)
    assert len(c.decisions) == 2 and "103.0 MiB" in c.decisions[-1].reason


def test_a_plan_the_replica_never_took_is_sent_again() -> None:
    """A plan lost or refused as malformed was never resent: the controller thought it done."""
    c = Controller(planner)
    first = c.report(tel(mask_version=MaskVersion(epoch=0, seq=0)), now_s=1000.0)
    assert first is not None
    again = c.report(tel(mask_version=MaskVersion(epoch=0, seq=0)), now_s=1000.3)
    assert again == first  # the replica still holds an older version
    assert c.report(tel(mask_version=first.version), now_s=1000.6) is None


def test_the_controller_prices_the_step_the_replicas_run() -> None:
    """Plan entries priced a bucket's whole batch × sequence of activations (183 MiB at
    8 × 2,048) while the replicas run steps of engine.max_step_tokens: two byte accountings."""
    from rap.serving.config import ServeAppConfig

    asked: list[int | None] = []

    class Recording(FnPlanner):
        def plan(self, budget_bytes, batch, seq, prefill_tokens=None):  # type: ignore[no-untyped-def]
            asked.append(prefill_tokens)
            return super().plan(budget_bytes, batch, seq, prefill_tokens)

    app = ServeAppConfig.model_validate({"engine": {"max_step_tokens": 128}})
    assert app.controller.step_tokens == 128
    Controller(Recording(plan), app.controller).report(tel(), now_s=1000.0)
    assert asked and set(asked) == {128}
