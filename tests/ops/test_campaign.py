"""The reliability campaign's plan and judging (rap.ops.campaign), without a live app; the live
short campaign is `test_a_short_campaign_holds_every_case` (slow)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest

from rap.ops import campaign, campaign_checks, campaign_report
from rap.ops.campaign import EVENTS, Observed, Plan

PLAN = Plan(duration_s=600, capacity_rps=1.0)
"""The 10-minute plan: bursts over 90–120 s and 360–390 s, the base load 0–90, 153–360 and
423–600 s; the drills at 156, 192, 282, 432 (the storm) and 510 s."""
T0 = 1000.0
LAYERS = 30
SPAN_S = {"disconnect-storm": 3.0}
"""How long each drill of the synthetic run lasts (5 s unless named)."""


def test_the_load_has_bursts_at_four_times_capacity_between_base_load() -> None:
    plan = Plan(duration_s=600, capacity_rps=2.0, pacing_s=4.0)
    shape = plan.shape()
    assert [u for _, u in shape] == [6, 32, 6, 32, 6]  # 0.7 × 2 × 4 ≈ 6, 4 × 2 × 4 = 32
    assert [t for t, _ in shape] == [90, 120, 360, 390, 600]
    lo, hi = plan.shock_s()
    assert (lo, hi) == (240, 330)
    assert all(0 < plan.at_s(e) < plan.duration_s for e in EVENTS)
    # The controller dies during the shock; no event sits in a burst but the storm's own load.
    kill = next(e for e in EVENTS if e.name == "kill-controller")
    assert lo < plan.at_s(kill) < hi
    # Base load: outside the bursts and the 33.3 s after each (10 s of backlog draining at the
    # 0.3 x capacity the base load leaves spare).
    got = [t for span in plan.base_windows() for t in span]
    assert got == pytest.approx([0, 90, 153.33, 360, 423.33, 600], abs=0.01)


def test_the_checks_constants_are_the_engines_defaults() -> None:
    from rap.serving.engine_config import EngineConfig

    engine = EngineConfig()
    assert engine.shed_wait_s == campaign_checks.SHED_WAIT_S
    assert engine.page_tokens == campaign_checks.PAGE_TOKENS
    assert campaign_checks.STORM_MAX_TOKENS > campaign_checks.WATCH_STEPS


def _tel(weight: int, kv: int, budget: int) -> dict:
    return {"weight_bytes": weight, "kv_bytes_reserved": kv, "budget_bytes": budget}


def test_bytes_over_budget_count_only_after_the_compliance_time() -> None:
    obs = Observed()
    obs.budget_steps = [(10.0, "r", 100)]
    obs.samples = [
        {"t": 5.0, "replicas": {"r": _tel(150, 0, 200)}},  # before the drop: 150 ≤ 200
        {"t": 11.0, "replicas": {"r": _tel(150, 0, 100)}},  # within 2 s of it: not judged
        {"t": 13.0, "replicas": {"r": _tel(90, 20, 100)}},  # 110 > 100: over
        {"t": 14.0, "replicas": {"r": {"error": "unreachable"}}},
    ]
    got = campaign.memory_check(obs, {"r": 200})
    assert got["checked"] == 2 and got["n_over"] == 1 and not got["ok"]
    assert got["over"][0] == {"t": 13.0, "replica": "r", "excess": 10}


def _records(**change: Any) -> list[dict]:
    """A healthy run's lines: a "sent" and a "done" line per request, one a second for 600 s,
    1 in 20 invalid (a 4xx); a 503 in the first burst; an error event for a request replica-0
    ran when it was killed (156 s). `change` goes into every valid request's outcome."""
    rec: list[dict[str, Any]] = []
    for i in range(600):
        r = {"t": T0 + i, "outcome": "ok", "ttft_s": 0.3, "e2e_s": 0.8}
        if i % 20 == 7:
            r = {"t": T0 + i, "outcome": "4xx", "invalid": True, "e2e_s": 0.1}
        elif i == 100:
            r = {"t": T0 + i, "outcome": "503", "retry_after": "2", "e2e_s": 1.0}
        elif i == 155:
            r = {**r, "t": T0 + 155.5, "outcome": "error_event", "error_code": "replica_failed"}
        elif change:
            r = {"t": r["t"], **change}
        rec.append(r)
    sent = [{"id": str(i), "phase": "sent", "t": r["t"]} for i, r in enumerate(rec)]
    return sent + [{**r, "id": str(i), "phase": "done"} for i, r in enumerate(rec)]


def _state(t: float, running: int = 2, storm: bool = False) -> dict:
    """One replica's telemetry: 10 steps a second, `running` rows of the load (a page each per
    layer) and, with `storm`, one storm row (21 pages per layer)."""
    pages = (running + 21 * storm) * LAYERS
    return {
        "steps": int(t * 10),
        "queue": {"running": running + storm, "waiting": 0},
        "kv_pages_in_use": pages,
        "attn_kept": LAYERS,
        **_tel(100, 50, 200),
    }


def _obs(storm_until_s: float = 435.0, **replace: Any) -> Observed:
    """Every drill held, each over its span; samples every 0.5 s with a storm row on replica-0
    while the storm's clients are connected and until `storm_until_s`."""
    obs = Observed()
    for e in EVENTS:
        t = PLAN.at_s(e)
        until = t + SPAN_S.get(e.name, 5.0)
        obs.events[e.name] = {"t": t, "until": until, "ok": True, "detail": "fine"}
    for k in range(1201):
        t = k / 2
        storm = 432 <= t < storm_until_s
        replicas = {"replica-0": _state(t, storm=storm), "replica-1": _state(t)}
        obs.samples.append({"t": t, "replicas": replicas | replace.get(str(t), {})})
    return obs


def _judge(records: list[dict], obs: Observed, counted: int | None = 600) -> dict:
    return campaign.judge(records, counted, obs, {"replica-0": 200, "replica-1": 200}, T0, PLAN)


def _failed(result: dict) -> dict[str, str]:
    return {c["case"]: c["observed"] for c in result["cases"] if not c["ok"]}


def test_a_healthy_campaign_holds_every_case() -> None:
    result = _judge(_records(), _obs())
    assert result["ok"], _failed(result)
    assert result["outcomes"]["ok"] == 568 and result["base_load"]["requests"] == 448
    text = campaign_report.markdown(result, PLAN, "head")
    assert "| answers |" in text and "| base load |" in text and "**no**" not in text


@pytest.mark.parametrize(
    "change",
    [
        {"outcome": "503", "retry_after": "2", "e2e_s": 30.0},  # every valid request refused
        {"outcome": "4xx", "e2e_s": 0.1},  # every valid request a 4xx
        {"outcome": "ok", "ttft_s": 119.0, "e2e_s": 119.5},  # every first token after 119 s
    ],
    ids=["only-503", "only-4xx", "ttft-119s"],
)
def test_runs_that_answer_nothing_well_fail(change: dict) -> None:
    """Each of these runs held every case of the first judge (which accepted every 503 and 4xx
    and bounded no latency)."""
    result = _judge(_records(**change), _obs())
    failed = _failed(result)
    assert "base load" in failed and not result["ok"], failed
    if change["outcome"] == "4xx":
        assert "invalid bodies" in failed  # a valid body is never a 4xx


@pytest.mark.parametrize(
    "change, case",
    [
        ({"outcome": "cut"}, "answers"),
        ({"outcome": "hung"}, "answers"),
        ({"outcome": "503_no_retry_after"}, "answers"),
        ({"outcome": "error_event", "error_code": "internal"}, "answers"),
        ({"outcome": "error_event", "error_code": "replica_failed"}, "answers"),  # no kill then
        ({"outcome": "ok", "invalid": True}, "invalid bodies"),
        ({"outcome": "4xx"}, "invalid bodies"),
    ],
)
def test_each_unaccepted_answer_fails_its_case(change: dict, case: str) -> None:
    records = _records()
    i = next(i for i, r in enumerate(records) if r.get("outcome") == "503")  # in a burst
    records[i] = {**records[i], **change}
    failed = _failed(_judge(records, _obs()))
    assert list(failed) == [case], failed


def test_a_lost_request_or_a_count_locust_does_not_share_fails() -> None:
    records = _records()
    del records[-1]  # sent, never answered
    failed = _failed(_judge(records, _obs(), counted=599))
    assert list(failed) == ["none lost"] and "lost 1" in failed["none lost"]
    for counted in (598, 601, None):  # locust counted other requests than were recorded
        failed = _failed(_judge(_records(), _obs(), counted=counted))
        assert list(failed) == ["none lost"], (counted, failed)


def test_an_event_that_did_not_hold_or_did_not_run_fails_the_campaign() -> None:
    obs = _obs()
    del obs.events["kill-controller"]
    obs.events["sigstop-replica"]["ok"] = False
    failed = _failed(_judge(_records(), obs))
    assert list(failed) == ["sigstop-replica", "kill-controller"]
    assert failed["kill-controller"] == "did not run"


def test_a_drill_whose_side_effects_did_not_happen_fails() -> None:
    """Killed at 156 s, back at 161 s: replica-1 must run steps and answer meanwhile."""
    frozen = {"replica-1": {**_state(156.0)}}
    obs = _obs(**{str(k / 2): frozen for k in range(312, 323)})  # replica-1 ran nothing
    failed = _failed(_judge(_records(), obs))
    assert list(failed) == ["kill-replica"] and "replica-1 ran 0 steps" in failed["kill-replica"]
    records = _records()  # every request sent while replica-0 was down answered after it
    for r in records:
        if r.get("phase") == "done" and 156 <= r["t"] - T0 <= 161:
            r["e2e_s"] = 6.0
    failed = _failed(_judge(records, _obs()))
    assert list(failed) == ["kill-replica"] and "0 requests" in failed["kill-replica"]


LASTS_S = {"kill-replica": 20.0, "kill-controller": 20.0, "disconnect-storm": 65.0}
"""How long a drill can last on a loaded machine: a restart (12 s, a successor 18 s in the
10-minute run), the storm's clients waiting up to 60 s for their first chunk."""


def test_side_effects_are_judged_only_apart_from_other_drills_and_at_the_base_load() -> None:
    """In the 60-s run the drills crowd each other: replica-0 was still restarting when
    replica-1 was stopped, and the burst's backlog covers the run's end. There the statement
    does not apply (reported, not judged); the 10-minute plan's drills all lie apart within
    the base load, with room for a restart (replica-0 was back 12 s after its kill)."""
    frozen = {"replica-0": {"error": "unreachable"}, "replica-1": {"error": "unreachable"}}
    obs = _obs(**{str(k / 2): frozen for k in range(384, 400)})  # both down over 192–200 s
    obs.events["kill-replica"]["until"] = 200.0  # still down when replica-1 is stopped at 192 s
    result = _judge(_records(), obs)
    observed = {c["case"]: c["observed"] for c in result["cases"]}
    assert result["ok"], _failed(result)
    assert "not judged from 156 to 200 s: overlaps sigstop-replica" in observed["kill-replica"]
    assert "overlaps kill-replica" in observed["sigstop-replica"]
    obs = _obs()
    obs.events["device-memory-fault"].update(t=365.0, until=370.0)  # in the second burst
    observed = {c["case"]: c["observed"] for c in _judge(_records(), obs)["cases"]}
    assert "not at the base load" in observed["device-memory-fault"]
    base = PLAN.base_windows()
    spans = sorted((PLAN.at_s(e), PLAN.at_s(e) + LASTS_S.get(e.name, e.seconds)) for e in EVENTS)
    for e in EVENTS:
        lo = PLAN.at_s(e)
        hi = lo + LASTS_S.get(e.name, e.seconds)
        assert not e.goes_on or any(a <= lo and hi <= b for a, b in base), e.name
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans)), spans


def test_the_storms_rows_must_go_within_a_few_steps_and_must_have_been_seen() -> None:
    """The clients hung up by 435 s; replica-0 runs 10 steps a second."""
    assert "disconnect-storm" not in _failed(_judge(_records(), _obs(storm_until_s=437.0)))
    late = _failed(_judge(_records(), _obs(storm_until_s=439.0)))  # 40 steps after: too late
    assert list(late) == ["disconnect-storm"] and "replica-0 40 steps" in late["disconnect-storm"]
    late = _failed(_judge(_records(), _obs(storm_until_s=442.0)))  # past the watch: never
    assert list(late) == ["disconnect-storm"] and "replica-0 never" in late["disconnect-storm"]
    unseen = _failed(_judge(_records(), _obs(storm_until_s=0.0)))  # the check could not tell
    assert list(unseen) == ["disconnect-storm"] and "never seen" in unseen["disconnect-storm"]
    back = _obs(**{"438.0": {"replica-1": _state(438.0, storm=True)}})  # admitted after
    failed = _failed(_judge(_records(), back))
    assert list(failed) == ["disconnect-storm"], failed


def test_a_storm_row_is_told_from_the_loads_rows_by_its_pages() -> None:
    """The engine's figures (the default model, a 325-token prompt beside two of the load's
    prompts, then with the storm's row cancelled): 23 pages per layer over 3 rows, then 2 over
    2; the load's rows hold at most 3 each, a storm row 21."""
    storm = {"kv_pages_in_use": 23 * 30, "attn_kept": 30, "queue": {"running": 3}}
    load = {"kv_pages_in_use": 2 * 30, "attn_kept": 30, "queue": {"running": 2}}
    assert campaign_checks.holds_storm_row(storm) and not campaign_checks.holds_storm_row(load)
    for b in range(8):  # one storm row shows beside any number of the load's rows, full or not
        full = {"kv_pages_in_use": (21 + 3 * b) * 30, "attn_kept": 30, "queue": {"running": b + 1}}
        assert campaign_checks.holds_storm_row(full)
        alone = {"kv_pages_in_use": (21 + b) * 30, "attn_kept": 30, "queue": {"running": b + 1}}
        assert campaign_checks.holds_storm_row(alone)


def test_the_timeline_draws(tmp_path: Path) -> None:
    obs = Observed()
    obs.budget_steps = [(2.0, "r", 50 * 2**20)]
    obs.samples = [{"t": float(t), "replicas": {"r": _tel(60 * 2**20, 0, 0)}} for t in range(6)]
    path = tmp_path / "timeline.png"
    campaign_report.timeline(obs, _records(), Plan(20, 1.0), {"r": 100 * 2**20}, path)
    assert path.stat().st_size > 1000


def test_the_stream_classifier_says_what_a_client_saw() -> None:
    """The stream classifier the locust file uses, on the lines a client reads."""
    chunk = {"choices": [{"text": "a", "finish_reason": None}]}
    final = {"choices": [{"text": "", "finish_reason": "length"}]}
    error = {"error": {"message": "replica-0 failed", "code": "replica_failed"}}
    cases = {
        "ok": [chunk, final, "[DONE]"],
        "cut": [chunk, chunk],
        "error_event": [chunk, error, "[DONE]"],
    }
    for want, events in cases.items():
        out: dict = {}
        lines = [f"data: {e if isinstance(e, str) else json.dumps(e)}" for e in events]
        campaign.classify_stream([x.encode() for x in lines], 0.0, out)
        assert out["outcome"] == want, (want, out)


def test_a_stopped_replica_gets_its_compliance_time_after_it_continues() -> None:
    """SIGSTOP from 5 to 15 s, a budget drop at 8 s: the samples up to 17 s are excused, the
    next is judged (and here over)."""
    obs = Observed()
    obs.budget_steps = [(8.0, "r", 100)]
    obs.paused = [("r", 5.0, 15.0)]
    obs.samples = [{"t": t, "replicas": {"r": _tel(150, 0, 100)}} for t in (12.0, 16.0, 18.0)]
    got = campaign.memory_check(obs, {"r": 200})
    assert got["checked"] == 1 and got["n_over"] == 1 and got["excused"] == 2


def _closed_loop(ends_s: list[float], outcome: str = "ok") -> list[dict[str, Any]]:
    sent = [{"id": str(i), "phase": "sent", "t": 100.0} for i in range(len(ends_s))]
    done = [
        {"id": str(i), "phase": "done", "t": 100.0, "e2e_s": e, "outcome": outcome}
        for i, e in enumerate(ends_s)
    ]
    return sent + done


def test_capacity_counts_answers_after_the_warm_up_and_before_the_end(tmp_path: Path) -> None:
    # A 30 s loop: answers end every 0.5 s from 0 s to 40 s; the rate is counted over 10-30 s.
    ends = [i * 0.5 for i in range(81)]
    rate = campaign.closed_loop_rate(_closed_loop(ends), 30.0)
    assert rate == pytest.approx(41 / 20)  # 10.0, 10.5, ..., 30.0: the warm-up and tail left out
    assert campaign.closed_loop_rate(_closed_loop(ends, "503"), 30.0) == 0.0  # refusals
    assert campaign.closed_loop_rate([], 30.0) == 0.0
    for i, part in enumerate((_closed_loop(ends[:40]), _closed_loop(ends[40:]))):
        (tmp_path / f"requests-{i}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    assert len(campaign.read_records(tmp_path)) == 2 * 81


def test_steps_are_counted_between_the_samples_that_bound_a_drill() -> None:
    """While a replica is stopped each sample waits ~5 s for its telemetry: over sigstop's
    192.009–202.015 s the 10-minute run sampled at 192.0, 197.5 and 202.1 s, and replica-0 ran
    97 → 99 → 130 steps. The samples just outside the span bound it (within two periods); one
    farther out does not count."""
    from rap.ops.campaign_checks import _steps_run

    def sample(t: float, steps: int) -> dict:
        return {"t": t, "replicas": {"replica-0": {"steps": steps}}}

    samples = [sample(190.5, 10), sample(192.0, 97), sample(197.5, 99), sample(202.1, 130)]
    assert _steps_run(samples, "replica-0", 192.009, 202.015) == 33
    assert _steps_run([sample(190.5, 10), sample(197.5, 99)], "replica-0", 192.0, 202.0) == 0
    far = [sample(190.0, 10), sample(197.5, 99), sample(204.0, 130)]
    assert _steps_run(far, "replica-0", 192.009, 202.015) == 0
