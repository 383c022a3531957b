"""The GPU run's wall-clock budgets (bench/gpu/budget.py), on a fake clock: a GPU run's parts
stop at their shares of the budget, a dry run has none and does its fixed work to the end
however slow the machine is, and the replicas dry run's phases end on what happened (a budget
seen moved), not on the clock."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench/gpu"))

import measure  # noqa: E402  (a script folder, not a package)
import replicas  # noqa: E402
from budget import Budget, Deadline, hold  # noqa: E402
from common import Report, random_llama  # noqa: E402
from memory_parts import part_blocks  # noqa: E402

ALL = ["memory", "blocks", "decode"]


class FakeClock:
    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s

    def sleep(self, seconds: float) -> None:
        self.now_s += seconds


def test_a_gpu_runs_parts_stop_at_their_shares_each_counted_from_its_start() -> None:
    clock = FakeClock()
    budget = measure.run_budget(False, 100.0, ALL, clock)
    memory = budget.deadline(0.3)  # 30 s of 100
    clock.now_s += 29.9
    assert not memory.passed()
    clock.now_s += 0.2
    assert memory.passed()
    blocks = budget.deadline(0.1)  # 10 s from now, not from the run's start
    clock.now_s += 9.9
    assert not blocks.passed()
    clock.now_s += 0.2
    assert blocks.passed()


def test_a_dry_run_has_no_budget_however_long_it_takes() -> None:
    clock = FakeClock()
    budget = measure.run_budget(True, 40.0, ALL, clock)
    assert budget.seconds is None
    deadline = budget.deadline(0.3)
    clock.now_s += 1e9
    assert not deadline.passed()


def test_budgets_that_cannot_be_shared_are_refused() -> None:
    with pytest.raises(ValueError, match="expected a positive number of seconds"):
        Budget(0.0)
    with pytest.raises(ValueError, match="expected a positive sum"):
        Budget(10.0, total_share=0.0)


def test_a_part_stops_at_a_spent_deadline_and_runs_to_done_without_one(tmp_path: Path) -> None:
    model = random_llama(toy=True)
    report = Report(tmp_path / "gpu.json", {})
    part_blocks(model, report, Deadline(0.0, clock=lambda: 1.0), toy=True)
    assert report.data["parts"]["blocks"]["status"] == "partial (time)"
    assert report.data["parts"]["blocks"]["rows"] == []
    report = Report(tmp_path / "gpu.json", {})
    clock = FakeClock()
    deadline = measure.run_budget(True, 1.0, ALL, clock).deadline(0.1)
    clock.now_s += 1e9  # a dry run on a very slow machine
    part_blocks(model, report, deadline, toy=True)
    out = report.data["parts"]["blocks"]
    assert out["status"] == "done" and len(out["rows"]) == 6  # 3 x (attn, mlp)


def test_hold_lasts_its_seconds_then_until_ready() -> None:
    clock, ticks = FakeClock(), []
    hold(4.0, lambda: ticks.append(clock()), clock=clock, sleep=clock.sleep)
    assert clock.now_s == pytest.approx(1004.0) and len(ticks) == 4
    checks: list[float] = []

    def ready() -> bool:  # what the phase waits for happens at fake second 1030
        checks.append(clock())
        return clock() >= 1030.0

    clock.now_s, ticks = 1000.0, []
    hold(4.0, lambda: ticks.append(clock()), ready, clock=clock, sleep=clock.sleep)
    assert clock.now_s >= 1030.0
    assert checks[0] >= 1004.0  # not asked before its seconds are up
    assert ticks  # the report is saved while it waits


def test_the_replicas_deadline_is_the_gpu_runs_only() -> None:
    assert replicas.alarm_s(110.0, gpu=False) is None
    assert replicas.alarm_s(110.0, gpu=True) == pytest.approx(110.0 - replicas.CLEANUP_S)


class FakeSampler:
    def __init__(self) -> None:
        self.samples: list[dict[str, Any]] = []
        self.reads = 0


class FakeCotenant:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = [{"t": 0.0, "event": "ready"}]
        self.held = 0


def _sample(t: float, budget: int) -> dict[str, Any]:
    reps = {f"replica-{i}": {"budget": budget, "held": 1} for i in range(2)}
    return {"t": t, "cotenant_bytes": 0, "nvml": None, "replicas": reps}


def test_a_dry_run_step_lasts_until_its_budgets_are_seen_moved(tmp_path: Path) -> None:
    args = argparse.Namespace(hold_s=9.0, step_frac=0.1, poll_s=0.25)
    run = replicas.Run(args, gpu=False, report=Report(tmp_path / "r.json", {}))
    sampler, cotenant = FakeSampler(), FakeCotenant()
    run.sampler, run.cotenant = sampler, cotenant  # type: ignore[assignment]
    sampler.samples.append(_sample(1.0, 100))
    cotenant.events.append({"t": 2.0, "event": "alloc", "ok": True, "held": 10})
    run.step_taken()
    sampler.samples.append(_sample(3.0, 100))  # not moved yet, however long that took
    sampler.reads += 2
    assert not run.step_seen()
    sampler.samples.append(_sample(4.0, 90))
    assert run.step_seen()
    # A budget that never moves: the run goes on after STEP_SAMPLES reads, and says so.
    cotenant.events.append({"t": 5.0, "event": "alloc", "ok": True, "held": 20})
    run.step_taken()
    sampler.reads += replicas.STEP_SAMPLES - 1
    assert not run.step_seen()
    sampler.reads += 1
    assert run.step_seen()
    assert "budgets not seen moved" in run.part["waits"][0]
