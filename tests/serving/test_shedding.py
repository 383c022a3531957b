"""Load shedding (rap.serving.shedding): a new request whose predicted start is too far away is
refused at once; the drain rate is measured only while rows wait; each row is judged once."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import rap
from rap.serving.routing import worth_retrying
from rap.serving.shedding import MIN_STARTS, DrainRate, Shedder
from tests.serving.test_scheduler import Collect, scheduler


@dataclass
class Waiting:
    id: int
    preemptions: int = 0


def backlogged_at(rate_rows_per_s: float, shed_wait_s: float | None = 10.0) -> Shedder:
    """A shedder that has watched a backlogged queue drain at `rate_rows_per_s` for 20 s."""
    shedder = Shedder(shed_wait_s, retry_after_s=2, backlogged=True, admitted_s=0.0)
    for t in range(1, 21):
        shedder.judge(float(t), round(rate_rows_per_s), [Waiting(0)], last_id=0)
    return shedder


def test_a_new_row_is_refused_exactly_when_its_predicted_start_exceeds_the_limit() -> None:
    """At 2 rows/s and a 10 s limit, the 20th new row in line starts in 10 s (queued); the 21st
    in 10.5 s (refused, Retry-After 11 s), and so is every row behind it."""
    shedder = backlogged_at(2.0)
    assert shedder.drain.rows_per_s() == pytest.approx(2.0)
    queue = [Waiting(i) for i in range(1, 26)]
    refused = shedder.judge(21.0, 2, queue, last_id=25)  # the rate holds at 2 rows/s
    assert [row.id for row, _ in refused] == list(range(21, 26))
    first = refused[0][1]
    assert first["status"] == 503 and first["code"] == "overloaded"
    assert first["retry_after"] == 11
    assert "10.5 s" in first["message"] and "shed_wait_s" in first["message"]


def test_rows_already_queued_keep_their_place_and_resumed_rows_are_never_shed() -> None:
    """A row judged once is not judged again when the rate later drops, and a preempted row
    back in the queue (its client had its start) is never refused."""
    shedder = backlogged_at(2.0)
    queue = [Waiting(i) for i in range(1, 21)]
    assert shedder.judge(21.0, 2, queue, last_id=20) == []
    for t in range(22, 80):  # the queue stops draining: the rate falls far below 2 rows/s
        shedder.judge(float(t), 0, queue, last_id=20)
    assert shedder.drain.rows_per_s() < 0.5
    assert shedder.judge(80.0, 0, queue, last_id=20) == []
    resumed = Waiting(21, preemptions=1)
    fresh = Waiting(22)
    refused = shedder.judge(81.0, 0, [*queue, resumed, fresh], last_id=22)
    assert [row.id for row, _ in refused] == [22]


def test_the_rate_counts_only_time_that_began_with_rows_waiting() -> None:
    """While nobody waits, starts follow arrivals, not capacity: that time is not counted."""
    shedder = Shedder(10.0, retry_after_s=2, admitted_s=0.0)
    for t in range(1, 11):  # idle queue: one start a second, nobody left waiting
        shedder.judge(float(t), 1, [], last_id=0)
    assert shedder.drain.rows_per_s() is None
    shedder.judge(11.0, 1, [Waiting(1)], last_id=1)  # now one waits after admission
    shedder.judge(11.5, 3, [Waiting(2)], last_id=2)  # 3 starts in 0.5 s of backlog
    shedder.judge(12.0, 3, [Waiting(3)], last_id=3)
    assert shedder.drain.rows_per_s() == pytest.approx(6.0, rel=0.02)


def test_a_cold_replica_sheds_nothing_and_none_disables_shedding() -> None:
    drain = DrainRate()
    drain.observe(1.0, int(MIN_STARTS) - 1)
    assert drain.predicted_wait_s(100) is None
    cold = Shedder(0.001, retry_after_s=2, backlogged=True, admitted_s=0.0)
    assert cold.judge(1.0, 1, [Waiting(i) for i in range(1, 50)], last_id=49) == []
    off = backlogged_at(2.0, shed_wait_s=None)
    assert off.judge(21.0, 0, [Waiting(i) for i in range(1, 200)], last_id=199) == []


def test_the_router_tries_an_overloaded_replicas_refusal_on_the_other() -> None:
    assert worth_retrying({"type": "error", "status": 503, "code": "overloaded"})


def test_the_scheduler_refuses_a_late_arrival_behind_a_backlog_and_serves_the_rest(
    served: dict[str, Path],
) -> None:
    """On a real tiny model: a burst queued while the rate is unknown is served in full; once
    the backlog has drained a few rows, a request that arrives behind it is refused at its first
    step with `overloaded`, and its refusal is counted."""
    model = rap.load_model(str(served["llama"]), device="cpu")
    sched, got = scheduler(model, max_running=1, shed_wait_s=1e-6), Collect()
    for key in range(8):
        sched.add(rap.serving.rows.Request([5, 6, 7], 3, ignore_eos=True), got.sink(key))
    steps = 0
    while sched.stats.admitted < MIN_STARTS + 2 and steps < 200:
        sched.step()
        steps += 1
    assert sched.waiting, "the backlog drained before a late arrival could be judged"
    sched.add(rap.serving.rows.Request([5, 6, 7], 3, ignore_eos=True), got.sink(99))
    sched.step()
    late: Any = got.done(99)
    assert late["type"] == "error" and late["code"] == "overloaded", late
    while not sched.idle and steps < 400:
        sched.step()
        steps += 1
    assert all(got.done(key)["type"] == "done" for key in range(8))
    assert sched.stats.shed == 1
