"""The reliability campaign (issue 15): load, a budget shock and faults on a live app, judged.

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
shape; no `cut`, `hung`, `5xx` or connection error; no request lost (locust's count equals the
records'); measured model bytes ≤ budget `COMPLIANCE_S` after every drop; and each event's own
check. Figures: p50/p99 of time to first token and end to end, requests per outcome.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

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


EVENTS = (
    Event(
        "kill-replica",
        0.25,
        0,
        "replica-0's actor is killed while it streams: its clients get an error event "
        "(503, replica_failed) or their answer, none hangs; Serve restarts it and it answers "
        "telemetry again; meanwhile requests go to replica-1",
    ),
    Event(
        "sigstop-replica",
        0.32,
        10,
        "replica-1's process is stopped for 10 s and continued: its requests finish late, "
        "none is lost or cut; new requests go to replica-0 meanwhile",
    ),
    Event(
        "kill-controller",
        0.47,
        0,
        "the controller is killed during the shock: serving goes on within budget, the "
        "successor resumes with a higher epoch",
    ),
    Event(
        "disconnect-storm",
        0.70,
        0,
        "40 streaming clients hang up, after their first chunk or (none within 60 s) while "
        "waiting, at least one mid-stream: once the load ends every replica holds no running "
        "row and no KV page",
    ),
    Event(
        "device-memory-fault",
        0.78,
        8,
        "the device-memory reading fails for 8 s: contained and counted (telemetry `errors` "
        "grows), no replica restarts, serving goes on",
    ),
)


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
        base, burst = self.users(0.7 * self.capacity_rps), self.users(4 * self.capacity_rps)
        steps: list[list[float]] = []
        for lo, hi in BURSTS:
            steps += [[lo * self.duration_s, base], [hi * self.duration_s, burst]]
        return [*steps, [self.duration_s, base]]

    def shock_s(self) -> tuple[float, float]:
        return SHOCK[0] * self.duration_s, SHOCK[1] * self.duration_s

    def at_s(self, event: Event) -> float:
        return event.at * self.duration_s


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
) -> dict[str, Any]:
    """Every case, each {"case", "expect", "observed", "ok"} (module doc). `lines`: what the
    locust file wrote, a "sent" and a "done" line per request (`rap.ops.locustfile`)."""
    records = [r for r in lines if r.get("phase") != "sent"]
    sent = {r["id"] for r in lines if r.get("phase") == "sent"}
    lost = sent - {r.get("id") for r in records}
    counts = {o: sum(r.get("outcome") == o for r in records) for o in OUTCOMES}
    counts["connect_error"] = sum(r.get("outcome") == "connect_error" for r in records)
    bad = {o: n for o, n in counts.items() if o not in ACCEPTED and n}
    events = [r for r in records if r.get("outcome") == "error_event"]
    stray = [r for r in events if r.get("error_code") != "replica_failed"]
    invalid_ok = [r for r in records if r.get("invalid") and r.get("outcome") != "4xx"]
    ok = [r for r in records if r.get("outcome") == "ok"]
    cases = [
        _case(
            "answers",
            "every request: 200, 4xx, 503 + Retry-After, or a replica_failed error event",
            f"{counts}",
            not bad and not stray,
        ),
        _case(
            "none lost",
            "every request sent has its answer (or its failure) recorded",
            f"sent {len(sent)}, answered {len(records)}, lost {len(lost)} (locust counted "
            f"{locust_requests})",
            not lost and len(records) == len(sent),
        ),
        _case(
            "invalid bodies",
            "every invalid request a 4xx",
            f"{len(invalid_ok)} were not",
            not invalid_ok,
        ),
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
    for e in EVENTS:
        got = obs.events.get(e.name, {"ok": False, "detail": "did not run"})
        cases.append(_case(e.name, e.expect, got["detail"], bool(got["ok"])))
    return {
        "cases": cases,
        "ok": all(c["ok"] for c in cases),
        "outcomes": counts,
        "requests": len(records),
        "ttft_s": _pct([r["ttft_s"] for r in ok if "ttft_s" in r]),
        "e2e_s": _pct([r["e2e_s"] for r in ok]),
        "memory": mem,
        "admin_latency_s": _pct(obs.admin_latency_s),
        "offered_rps": offered(records, t0),
    }


def _case(case: str, expect: str, observed: str, ok: bool) -> dict[str, Any]:
    return {"case": case, "expect": expect, "observed": observed, "ok": ok}


def offered(records: list[dict[str, Any]], t0: float, window_s: float = 10.0) -> dict[str, float]:
    """Requests started per second: the mean, and the busiest `window_s` window."""
    starts = sorted(r["t"] - t0 for r in records)
    if not starts:
        return {"mean": 0.0, "peak": 0.0}
    span = max(starts[-1] - starts[0], window_s)
    edges = np.arange(starts[0], starts[-1] + window_s, window_s)
    hist, _ = np.histogram(starts, bins=edges) if len(edges) > 1 else ([len(starts)], None)
    return {"mean": len(starts) / span, "peak": float(max(hist)) / window_s}


def markdown(result: dict[str, Any], plan: Plan, head: str) -> str:
    lines = [head, "", "| case | expected | observed | held |", "|---|---|---|---|"]
    for c in result["cases"]:
        lines.append(
            f"| {c['case']} | {c['expect']} | {c['observed']} | {'yes' if c['ok'] else '**no**'} |"
        )
    t, e = result["ttft_s"], result["e2e_s"]

    def f(x: float | None) -> str:
        return "–" if x is None else f"{x:.2f}"

    lines += [
        "",
        f"Capacity {plan.capacity_rps:.2f} req/s (closed loop); offered "
        f"{result['offered_rps']['mean']:.2f} req/s on average, "
        f"{result['offered_rps']['peak']:.2f} at the busiest 10 s.",
        f"Answered requests (ok): TTFT p50 {f(t['p50'])} s, p99 {f(t['p99'])} s; end to end "
        f"p50 {f(e['p50'])} s, p99 {f(e['p99'])} s.",
        f"Budget changes acknowledged in p50 {f(result['admin_latency_s']['p50'])} s, p99 "
        f"{f(result['admin_latency_s']['p99'])} s (the step counts from when it was sent).",
        f"Outcomes: {result['outcomes']}",
    ]
    return "\n".join(lines)


def timeline(
    obs: Observed, records: list[dict[str, Any]], plan: Plan, starts: dict[str, int], path: Any
) -> None:
    """Per replica bytes held against its budget; requests started per 5 s by outcome; the
    shock and every event marked."""
    import matplotlib  # lazy: optional (plots)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: optional (plots)

    names = sorted(starts)
    fig, ax = plt.subplots(len(names) + 1, 1, figsize=(10, 3 * (len(names) + 1)), sharex=True)
    for a, name in zip(ax, names, strict=False):
        pts = [(s["t"], s["replicas"][name]) for s in obs.samples if name in s["replicas"]]
        live = [(t, x) for t, x in pts if "error" not in x]
        t = [p[0] for p in live]
        a.plot(
            t,
            [(x["weight_bytes"] + x["kv_bytes_reserved"]) / 2**20 for _, x in live],
            label="held (measured)",
        )
        a.step(
            t,
            [budget_at(obs, name, x, starts[name]) / 2**20 for x in t],
            where="post",
            label="budget",
        )
        down = [p[0] for p in pts if "error" in p[1]]
        a.plot(down, [0] * len(down), "k|", label="no answer")
        a.set_ylabel(f"{name} MiB")
        a.legend(loc="lower left", fontsize=8)
    t0 = min((r["t"] for r in records), default=0.0)
    edges = np.arange(0, plan.duration_s + 5, 5.0)
    bottom = np.zeros(len(edges) - 1)
    for outcome in (*OUTCOMES, "connect_error"):
        at = [r["t"] - t0 for r in records if r.get("outcome") == outcome]
        if at:
            hist, _ = np.histogram(at, bins=edges)
            ax[-1].bar(edges[:-1], hist / 5.0, 5.0, bottom=bottom, align="edge", label=outcome)
            bottom += hist / 5.0
    ax[-1].set_ylabel("requests/s started")
    ax[-1].set_xlabel("seconds")
    ax[-1].legend(loc="upper right", fontsize=8)
    lo, hi = plan.shock_s()
    for a in ax:
        a.axvspan(lo, hi, color="orange", alpha=0.12)
        for e in plan.events:
            a.axvline(plan.at_s(e), color="red", lw=0.8, ls="--")
    for e in plan.events:
        ax[0].text(plan.at_s(e), ax[0].get_ylim()[1], e.name, rotation=90, va="top", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
