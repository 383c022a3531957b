"""The reliability campaign's plan and judging (rap.ops.campaign), without a live app; the live
short campaign is `test_a_short_campaign_on_the_live_app` (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rap.ops import campaign
from rap.ops.campaign import EVENTS, Observed, Plan


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


def _records() -> list[dict]:
    """What the locust file writes: a "sent" line, then the outcome, per request."""
    rec = [{"t": 100.0 + i, "outcome": "ok", "ttft_s": 0.5, "e2e_s": 1.0 + i} for i in range(10)]
    rec.append({"t": 111.0, "outcome": "4xx", "invalid": True})
    rec.append({"t": 112.0, "outcome": "503", "retry_after": "2"})
    rec.append({"t": 113.0, "outcome": "error_event", "error_code": "replica_failed"})
    sent = [{"id": str(i), "phase": "sent", "t": r["t"]} for i, r in enumerate(rec)]
    return sent + [{**r, "id": str(i), "phase": "done"} for i, r in enumerate(rec)]


def _obs_all_events_ok() -> Observed:
    obs = Observed()
    obs.events = {e.name: {"t": 1.0, "ok": True, "detail": "fine"} for e in EVENTS}
    return obs


def test_a_campaign_holds_when_every_answer_is_accepted_and_every_event_held() -> None:
    result = campaign.judge(_records(), 13, _obs_all_events_ok(), {}, t0=100.0)
    assert result["ok"], [c for c in result["cases"] if not c["ok"]]
    assert result["outcomes"]["ok"] == 10 and result["e2e_s"]["p50"] == pytest.approx(5.5)
    text = campaign.markdown(result, Plan(60, 1.0), "head")
    assert "| answers |" in text and "**no**" not in text


@pytest.mark.parametrize(
    "change, case",
    [
        ({"outcome": "cut"}, "answers"),
        ({"outcome": "hung"}, "answers"),
        ({"outcome": "503_no_retry_after"}, "answers"),
        ({"outcome": "error_event", "error_code": "internal"}, "answers"),
        ({"outcome": "ok", "invalid": True}, "invalid bodies"),
    ],
)
def test_each_unaccepted_answer_fails_its_case(change: dict, case: str) -> None:
    records = _records()
    records[13] = {**records[13], **change}
    result = campaign.judge(records, 13, _obs_all_events_ok(), {}, t0=100.0)
    failed = [c["case"] for c in result["cases"] if not c["ok"]]
    assert failed == [case] and not result["ok"]


def test_a_lost_request_or_an_event_that_did_not_hold_fails_the_campaign() -> None:
    records = _records()
    del records[-1]  # sent, never answered
    lost = campaign.judge(records, 12, _obs_all_events_ok(), {}, t0=100.0)
    failed = {c["case"]: c["observed"] for c in lost["cases"] if not c["ok"]}
    assert list(failed) == ["none lost"] and "lost 1" in failed["none lost"]
    obs = _obs_all_events_ok()
    del obs.events["kill-replica"]
    obs.events["sigstop-replica"]["ok"] = False
    result = campaign.judge(_records(), 13, obs, {}, t0=100.0)
    failed = {c["case"]: c["observed"] for c in result["cases"] if not c["ok"]}
    assert failed == {"kill-replica": "did not run", "sigstop-replica": "fine"}


def test_the_timeline_draws(tmp_path: Path) -> None:
    obs = Observed()
    obs.budget_steps = [(2.0, "r", 50 * 2**20)]
    obs.samples = [{"t": float(t), "replicas": {"r": _tel(60 * 2**20, 0, 0)}} for t in range(6)]
    path = tmp_path / "timeline.png"
    campaign.timeline(obs, _records(), Plan(20, 1.0), {"r": 100 * 2**20}, path)
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
