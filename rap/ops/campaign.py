"""The reliability campaign: load, a budget shock and faults on a live app, judged.

`rap campaign` (rap/cli/campaign.py) serves the default model on a local Ray cluster (two
replicas, an API key, an admin token, the fault folder), measures the requests per second the
app completes in a closed loop (its capacity), runs locust (`rap.ops.locustfile`) with the
shape below, and performs each event of the plan at its time while it samples `/admin/state`:

    load        0.7 × capacity; bursts of 4 × capacity over BURSTS (fractions of the run)
    shock       both replicas' budgets drop to `shock_gib` over SHOCK, then return
    faults      each with its outcome stated before it runs (`Event.expect`): a replica actor
                killed mid-stream, a replica stopped for 10 s (SIGSTOP), the controller killed,
                a storm of client disconnects, the device-memory reading failing

Judged (`judge`), every case a line of the report: every request answered 200, 4xx, 503 with
Retry-After or, only for requests a killed replica was running, an error event in OpenAI's
shape; no `cut`, `hung`, `5xx` or connection error; no request lost (every one sent has its
record, and locust's own count equals the records'); every invalid body a 4xx and no valid one;
at the base load the service `BASE_LOAD` states (share answered 200, time to first token);
measured model bytes ≤ budget `COMPLIANCE_S` after every drop; and each event's own check and
side effects (`rap.ops.campaign_checks`). Figures: p50/p99 of time to first token and end to
end, requests per outcome.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rap.ops import campaign_checks as checks
from rap.ops.campaign_checks import FREE_STEPS, STORM_MAX_TOKENS, WATCH_STEPS, BaseLoad

OUTCOMES = ("ok", "4xx", "503", "error_event", "503_no_retry_after", "5xx", "cut", "hung")
ACCEPTED = ("ok", "4xx", "503", "error_event")
COMPLIANCE_S = 2.0
BURSTS = ((0.15, 0.20), (0.60, 0.65))
SHOCK = (0.40, 0.55)


def classify_stream(lines: Any, t0: float, out: dict[str, Any]) -> None:
    """Read a stream's lines (bytes or str) to the end; fill `out` with what the client saw:
    its outcome (`ok`, `error_event` or `cut`), time to first token and tokens."""
    done = finished = False
    for raw in lines:
        line = raw.decode() if isinstance(raw, bytes) else raw
        if not line.startswith("data: "):
            continue
        data = line[6:]
        if data == "[DONE]":
            done = True
            break
        chunk = json.loads(data)
        if "error" in chunk:
            out["outcome"], out["error"] = "error_event", chunk["error"]
            out["error_code"] = chunk["error"].get("code")
            continue
        out.setdefault("ttft_s", time.time() - t0)
        out["tokens"] = out.get("tokens", 0) + 1
        finished = finished or chunk["choices"][0].get("finish_reason") is not None
    if out.get("outcome") != "error_event":
        out["outcome"] = "ok" if done and finished else "cut"


@dataclass(frozen=True)
class Event:
    """One thing the campaign does to the app, and what must follow."""

    name: str
    at: float
    """When, as a fraction of the run."""
    seconds: float
    """How long it lasts (0: an instant)."""
    expect: str
    """The outcome, stated before it runs."""
    goes_on: tuple[str, ...] = ()
    """Replicas that must run engine steps while it lasts; for such an event a valid request
    sent meanwhile must also be answered 200 before it ends (`checks.side_effects`)."""


EVENTS = (
    Event(
        "kill-replica",
        0.26,  # past the first burst's settling (its backlog drains by 153 s of 600)
        0,
        "replica-0's actor is killed while it streams: its clients get an error event "
        "(503, replica_failed) or their answer, none hangs; Serve restarts it and it answers "
        "telemetry again; meanwhile requests go to replica-1 (it runs steps, requests sent "
        "meanwhile are answered 200 before replica-0 is back)",
        goes_on=("replica-1",),
    ),
    Event(
        "sigstop-replica",
        0.32,
        10,
        "replica-1's process is stopped for 10 s and continued: its requests finish late, "
        "none is lost or cut; new requests go to replica-0 meanwhile (it runs steps, requests "
        "sent meanwhile are answered 200 before replica-1 continues)",
        goes_on=("replica-0",),
    ),
    Event(
        "kill-controller",
        0.47,
        0,
        "the controller is killed during the shock: serving goes on within budget (both "
        "replicas run steps, requests sent meanwhile are answered 200 before the successor "
        "answers), the successor resumes with a higher epoch",
        goes_on=("replica-0", "replica-1"),
    ),
    Event(
        "disconnect-storm",
        0.72,  # past the second burst's settling (its backlog drains by 423 s of 600)
        0,
        f"40 streaming clients ({STORM_MAX_TOKENS} tokens asked of a 325-token prompt) hang "
        "up, after their first chunk or (none within 60 s) while waiting, at least one "
        "mid-stream: their rows, seen while they are connected, are gone from every replica "
        f"within {FREE_STEPS} engine steps of the last hang-up and none comes back within "
        f"{WATCH_STEPS}; once the load ends every replica holds no running row and no KV page",
    ),
    Event(
        "device-memory-fault",
        0.85,  # after the storm, whose clients wait up to 60 s: its side effects stand alone
        8,
        "the device-memory reading fails for 8 s: contained and counted (telemetry `errors` "
        "grows), no replica restarts, serving goes on (both replicas run steps, requests sent "
        "meanwhile are answered 200 before it ends)",
        goes_on=("replica-0", "replica-1"),
    ),
)
BASE_LOAD = BaseLoad(min_success=0.95, ttft_p50_s=2.0, ttft_p99_s=20.0)
"""What valid requests at the base load get, stated with EVENTS before the run: at 0.7 ×
capacity a request should start within a couple of seconds; p99 leaves room for a replica
stopped for 10 s or restarting, the drills that happen at the base load."""


@dataclass
class Plan:
    """The run's timetable, in seconds, for a duration and a measured capacity."""

    duration_s: float
    capacity_rps: float
    pacing_s: float = 16.0
    """Seconds between a user's requests. Users are closed-loop: they offer users / pacing_s
    only while a request takes less than pacing_s, so a burst of 4 × capacity needs a pacing
    longer than the latency the burst causes (4 s offered 2.9 × at the busiest 10 s)."""
    events: tuple[Event, ...] = EVENTS

    def users(self, rate_rps: float) -> int:
        """Closed-loop users that offer `rate_rps`: one request every `pacing_s` each."""
        return max(1, round(rate_rps * self.pacing_s))

    def shape(self) -> list[list[float]]:
        """[[until_s, users], ...] for the locust file (RAP_CAMPAIGN_SHAPE)."""
        base = self.users(checks.BASE_SHARE * self.capacity_rps)
        burst = self.users(checks.BURST_SHARE * self.capacity_rps)
        steps: list[list[float]] = []
        for lo, hi in BURSTS:
            steps += [[lo * self.duration_s, base], [hi * self.duration_s, burst]]
        return [*steps, [self.duration_s, base]]

    def shock_s(self) -> tuple[float, float]:
        return SHOCK[0] * self.duration_s, SHOCK[1] * self.duration_s

    def at_s(self, event: Event) -> float:
        return event.at * self.duration_s

    def base_windows(self) -> list[tuple[float, float]]:
        """[from_s, to_s) spans of run time at the base load, each burst's backlog gone
        (`checks.SETTLE_S` after it)."""
        spans, start = [], 0.0
        for lo, hi in BURSTS:
            spans.append((start, lo * self.duration_s))
            start = hi * self.duration_s + checks.SETTLE_S
        spans.append((start, self.duration_s))
        return [(a, b) for a, b in spans if b > a]


@dataclass
class Observed:
    """What the harness saw: samples of /admin/state, budget steps and event results."""

    samples: list[dict[str, Any]] = field(default_factory=list)
    """{"t", "replicas": {name: telemetry or {"error"}}, "epoch"} every sample period."""
    budget_steps: list[tuple[float, str, int]] = field(default_factory=list)
    """(t, replica, bytes) of every budget change the harness made."""
    paused: list[tuple[str, float, float]] = field(default_factory=list)
    """(replica, from, to) while it could not follow a budget step: its process stopped
    (SIGSTOP), or killed until its successor answered."""
    admin_latency_s: list[float] = field(default_factory=list)
    """Seconds each budget change took to be acknowledged."""
    events: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per event: {"t", "ok": bool, "detail": str} from the harness's own check."""


def budget_at(obs: Observed, replica: str, t: float, start: int) -> int:
    current = start
    for at, name, nbytes in obs.budget_steps:
        if name == replica and at <= t:
            current = nbytes
    return current


def memory_check(obs: Observed, starts: dict[str, int]) -> dict[str, Any]:
    """Samples whose measured bytes (weights + KV pool) exceed the budget more than
    COMPLIANCE_S after that replica's latest budget step. A stopped process frees nothing, and a
    killed one's successor starts at its configured budget until the budget steps sent while it
    was down reach it (Serve delivers them once it is up), so in both cases its compliance clock
    restarts when it answers again (`paused`, counted as `excused`)."""
    over, checked, excused = [], 0, 0
    for s in obs.samples:
        for name, tel in s["replicas"].items():
            if "error" in tel:
                continue
            steps = [at for at, n, _ in obs.budget_steps if n == name and at <= s["t"]]
            steps += [end for n, start, end in obs.paused if n == name and start <= s["t"]]
            if steps and s["t"] - max(steps) < COMPLIANCE_S:
                excused += any(n == name and a <= s["t"] for n, a, _ in obs.paused)
                continue
            checked += 1
            held = tel["weight_bytes"] + tel["kv_bytes_reserved"]
            budget = budget_at(obs, name, s["t"], starts[name])
            if held > budget:
                over.append({"t": round(s["t"], 2), "replica": name, "excess": held - budget})
    return {
        "ok": not over,
        "checked": checked,
        "over": over[:20],
        "n_over": len(over),
        "excused": excused,
    }


def _pct(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None}
    return {"p50": float(np.percentile(values, 50)), "p99": float(np.percentile(values, 99))}


def judge(
    lines: list[dict[str, Any]],
    locust_requests: int | None,
    obs: Observed,
    starts: dict[str, int],
    t0: float,
    plan: Plan,
) -> dict[str, Any]:
    """Every case, each {"case", "expect", "observed", "ok"} (module doc). `lines`: what the
    locust file wrote, a "sent" and a "done" line per request (`rap.ops.locustfile`);
    `locust_requests`: the requests locust itself counted (None: unknown, which fails)."""
    records = [r for r in lines if r.get("phase") != "sent"]
    sent = {r["id"] for r in lines if r.get("phase") == "sent"}
    lost = sent - {r.get("id") for r in records}
    counts = {o: sum(r.get("outcome") == o for r in records) for o in OUTCOMES}
    counts["connect_error"] = sum(r.get("outcome") == "connect_error" for r in records)
    bad = {o: n for o, n in counts.items() if o not in ACCEPTED and n}
    kill = obs.events.get("kill-replica", {})
    stray = checks.stray_error_events(records, t0, [kill["t"]] if "t" in kill else [])
    invalid_not_4xx = sum(bool(r.get("invalid")) and r.get("outcome") != "4xx" for r in records)
    valid_4xx = sum(not r.get("invalid") and r.get("outcome") == "4xx" for r in records)
    ok = [r for r in records if r.get("outcome") == "ok"]
    base = checks.base_load(records, t0, plan.base_windows(), BASE_LOAD)
    cases = [
        _case(
            "answers",
            "every request: 200, 4xx, 503 + Retry-After, or a replica_failed error event for "
            "a request replica-0 was running when it was killed",
            f"{counts}; {stray} error events not owed to the kill",
            not bad and not stray,
        ),
        _case(
            "none lost",
            "every request sent has its answer (or its failure) recorded, and locust counted "
            "as many requests as were recorded",
            f"sent {len(sent)}, answered {len(records)}, lost {len(lost)}; locust counted "
            f"{locust_requests}",
            not lost and len(records) == len(sent) and locust_requests == len(records),
        ),
        _case(
            "invalid bodies",
            "every invalid request a 4xx, no valid one a 4xx",
            f"{invalid_not_4xx} invalid ones were not a 4xx; {valid_4xx} valid ones were",
            not invalid_not_4xx and not valid_4xx,
        ),
        _case("base load", BASE_LOAD.expect(), base["detail"], base["ok"]),
    ]
    mem = memory_check(obs, starts)
    cases.append(
        _case(
            "within budget",
            f"measured bytes ≤ budget {COMPLIANCE_S:.0f} s after every budget step",
            f"{mem['n_over']} of {mem['checked']} replica samples over ({mem['excused']} "
            "more within the compliance time after a SIGSTOP ended)",
            mem["ok"],
        )
    )
    cases += [_event_case(e, obs, records, t0, plan) for e in EVENTS]
    return {
        "cases": cases,
        "ok": all(c["ok"] for c in cases),
        "outcomes": counts,
        "requests": len(records),
        "base_load": base,
        "ttft_s": _pct([r["ttft_s"] for r in ok if "ttft_s" in r]),
        "e2e_s": _pct([r["e2e_s"] for r in ok]),
        "memory": mem,
        "admin_latency_s": _pct(obs.admin_latency_s),
        "offered_rps": offered(records, t0),
    }


def _event_case(
    e: Event, obs: Observed, records: list[dict[str, Any]], t0: float, plan: Plan
) -> dict[str, Any]:
    """The drill's own check, and what it states happens meanwhile."""
    got = obs.events.get(e.name, {"ok": False, "detail": "did not run"})
    held, detail = bool(got["ok"]), str(got["detail"])
    others = {
        n: (float(g["t"]), float(g["until"] if g.get("until") is not None else math.inf))
        for n, g in obs.events.items()
        if n != e.name and g.get("t") is not None
    }
    if "t" in got and e.name == "disconnect-storm":
        side = checks.storm_freed(got, obs.samples)
    elif "t" in got and e.goes_on:
        base = plan.base_windows()
        side = checks.side_effects(got, e.goes_on, records, obs.samples, t0, base, others)
    else:
        side = {"ok": True, "detail": ""}
    detail = f"{detail}; {side['detail']}" if side["detail"] else detail
    return _case(e.name, e.expect, detail, held and bool(side["ok"]))


def _case(case: str, expect: str, observed: str, ok: bool) -> dict[str, Any]:
    return {"case": case, "expect": expect, "observed": observed, "ok": ok}


def clear_records(folder: Path) -> None:
    """Remove the request lines an earlier run left in `folder` (`read_records` reads them all)."""
    for part in folder.glob("requests-*.jsonl"):
        part.unlink()


def read_records(folder: Path) -> list[dict[str, Any]]:
    """Every line the locust processes wrote into `folder` (`requests-<pid>.jsonl`)."""
    return [
        json.loads(line)
        for p in sorted(folder.glob("requests-*.jsonl"))
        for line in p.read_text().splitlines()
    ]


MIN_CAPACITY_ANSWERS = 16
"""Answers a capacity run must count before its rate is believed (`rap.cli.campaign.capacity`
measures again, over twice the time, until it has them: a loaded machine is slow, not idle)."""


def closed_loop_answers(records: list[dict[str, Any]], seconds: float) -> int:
    """Requests answered `ok` by a closed loop that ran `seconds` that ended after its first
    third (the replicas warm, every user's loop under way) and before its end. Refusals, errors
    and invalid requests do not count as capacity."""
    sent = [r["t"] for r in records if r.get("phase") == "sent"]
    if not sent or seconds <= 0:
        return 0
    lo, hi = min(sent) + seconds / 3, min(sent) + seconds
    ended = [
        r["t"] + r["e2e_s"]
        for r in records
        if r.get("phase") == "done" and r.get("outcome") == "ok" and not r.get("invalid")
    ]
    return sum(lo <= t <= hi for t in ended)


def closed_loop_rate(records: list[dict[str, Any]], seconds: float) -> float:
    """`closed_loop_answers` per second of the span they are counted over."""
    if seconds <= 0:
        return 0.0
    return closed_loop_answers(records, seconds) / (seconds * 2 / 3)


def offered(records: list[dict[str, Any]], t0: float, window_s: float = 10.0) -> dict[str, float]:
    """Requests started per second: the mean, and the busiest `window_s` window."""
    starts = sorted(r["t"] - t0 for r in records)
    if not starts:
        return {"mean": 0.0, "peak": 0.0}
    span = max(starts[-1] - starts[0], window_s)
    edges = np.arange(starts[0], starts[-1] + window_s, window_s)
    hist, _ = np.histogram(starts, bins=edges) if len(edges) > 1 else ([len(starts)], None)
    return {"mean": len(starts) / span, "peak": float(max(hist)) / window_s}
