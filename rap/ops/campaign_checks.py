"""The campaign's checks beyond each answer's outcome (`rap.ops.campaign.judge` runs them).

    base load       the service valid requests get while the load is at its base level: the
                    share answered 200 and their time to first token, against bounds stated
                    before the run (`BaseLoad`, `rap.ops.campaign.BASE_LOAD`)
    side effects    what a drill states happens meanwhile ("requests go to replica-1"): the
                    replicas that must go on ran engine steps while it lasted, and requests sent
                    while it lasted were answered 200 before it ended
    storm           the disconnect storm's rows are freed within `FREE_STEPS` engine steps of
                    its last hang-up, and none comes back within `WATCH_STEPS`
    error events    only a request a killed replica was running gets one

Pure functions of what the harness recorded: the locust file's records (`t` absolute, `e2e_s`)
and the samples of `/admin/state` (`t` seconds since the harness's `t0`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

PAGE_TOKENS = 16
"""The engine's default KV page (rap.serving.engine_config.EngineConfig.page_tokens); the
campaign's app does not change it."""
ROW_TOKENS_MAX = 33
"""The longest row of the campaign's load: its prompts are 6 to 9 tokens of the default model's
tokenizer (`rap.ops.locustfile.PROMPTS`) and it asks for ≤ 24 tokens."""
ROW_PAGES_MAX = -(-ROW_TOKENS_MAX // PAGE_TOKENS)
"""KV pages per attention layer such a row holds at most (3)."""
STORM_PROMPT = "Tell me a long story about a river. " + "The river ran on and on. " * 45
"""325 tokens of the default model's tokenizer: 21 pages per layer once prefilled. A row that
holds so many shows among up to 7 of the load's rows (21 + b > 3 · (1 + b) for b ≤ 8)."""
STORM_MAX_TOKENS = 256
"""A storm stream left alone runs this many steps: far more than `FREE_STEPS`."""
FREE_STEPS = 32
"""Engine steps after the storm's last hang-up by which no replica may run a storm row (the
hang-up reaches the engine through Serve's proxy and the router, then the row goes at its next
step)."""
WATCH_STEPS = 64
"""Engine steps after the last hang-up within which no storm row may come back (a hung-up
request left waiting would be admitted later)."""
BASE_SHARE = 0.7
"""The base load, as a share of the measured capacity."""
BURST_SHARE = 4.0
"""A burst's load, as a multiple of the measured capacity."""
SHED_WAIT_S = 10.0
"""The engine's default `shed_wait_s` (rap.serving.engine_config): a request whose predicted
start is further away is refused at once, so a burst leaves at most this many seconds of work
queued at each replica."""
SETTLE_S = SHED_WAIT_S / (1 - BASE_SHARE)
"""Seconds after a burst during which the load is not judged as base load: the backlog it
leaves (`SHED_WAIT_S` of work) drains at the capacity the base load leaves spare, 1 −
`BASE_SHARE` of it, and the requests sent meanwhile wait behind it."""


@dataclass(frozen=True)
class BaseLoad:
    """What valid requests sent at the base load get, stated before the run (faults included:
    each drill happens at the base load)."""

    min_success: float
    """Share of them answered 200 (error events, 503s and 4xx count against it)."""
    ttft_p50_s: float
    """Median time to first token of those answered 200 (whole answers: their end to end)."""
    ttft_p99_s: float
    """Its 99th percentile: room for the drills (a replica stopped for 10 s, one restarted)."""
    min_requests: int = 5
    """Fewer valid requests than this at the base load judge nothing: the case fails."""

    def expect(self) -> str:
        return (
            f"valid requests sent at the base load (not within {SETTLE_S:.0f} s after a burst): "
            f"≥ {self.min_success:.0%} answered 200; time to first token p50 ≤ "
            f"{self.ttft_p50_s:g} s, p99 ≤ {self.ttft_p99_s:g} s"
        )


def _sent_s(r: dict[str, Any], t0: float) -> float:
    return float(r["t"]) - t0


def _ended_s(r: dict[str, Any], t0: float) -> float:
    return float(r["t"]) - t0 + float(r.get("e2e_s", math.inf))


def base_load(
    records: list[dict[str, Any]], t0: float, windows: list[tuple[float, float]], bounds: BaseLoad
) -> dict[str, Any]:
    """The valid requests sent within `windows` ([from_s, to_s) of run time), judged."""
    at_base = [
        r
        for r in records
        if not r.get("invalid") and any(lo <= _sent_s(r, t0) < hi for lo, hi in windows)
    ]
    ok = [r for r in at_base if r.get("outcome") == "ok"]
    ttft = [float(r["ttft_s"]) for r in ok if "ttft_s" in r]
    success = len(ok) / len(at_base) if at_base else 0.0
    p50 = float(np.percentile(ttft, 50)) if ttft else math.inf
    p99 = float(np.percentile(ttft, 99)) if ttft else math.inf
    held = (
        len(at_base) >= bounds.min_requests
        and success >= bounds.min_success
        and p50 <= bounds.ttft_p50_s
        and p99 <= bounds.ttft_p99_s
    )
    spans = ", ".join(f"{lo:.0f}–{hi:.0f} s" for lo, hi in windows)
    detail = (
        f"{len(at_base)} valid requests sent over {spans}: {success:.1%} answered 200; "
        f"TTFT p50 {p50:.2f} s, p99 {p99:.2f} s"
    )
    return {
        "ok": held,
        "detail": detail,
        "requests": len(at_base),
        "success": success,
        "ttft_p50_s": p50,
        "ttft_p99_s": p99,
    }


def stray_error_events(records: list[dict[str, Any]], t0: float, kills_s: list[float]) -> int:
    """Error events not owed to a kill: of another code, or for a request that was not running
    (sent before, ended after) when a replica was killed."""
    return sum(
        r.get("outcome") == "error_event"
        and (
            r.get("error_code") != "replica_failed"
            or not any(_sent_s(r, t0) <= k <= _ended_s(r, t0) for k in kills_s)
        )
        for r in records
    )


SAMPLE_SLACK_S = 1.0
"""Seconds outside a drill's span a sample may lie and still bound it: two sample periods. A
stopped replica makes each sample of the app's state wait for its telemetry (about 5 s), so
over a 10-s drill the samples strictly inside it can be one."""


def _steps_run(samples: list[dict[str, Any]], replica: str, lo: float, hi: float) -> int:
    """Engine steps `replica` ran between the first and the last sample that it answered
    within [lo − SAMPLE_SLACK_S, hi + SAMPLE_SLACK_S], taking the last sample at or before lo
    and the first at or after hi where there are (0 when fewer than two answered, or its
    counter went back: a new process)."""
    seen = [
        (s["t"], s["replicas"][replica]["steps"])
        for s in samples
        if lo - SAMPLE_SLACK_S <= s["t"] <= hi + SAMPLE_SLACK_S
        and "error" not in s["replicas"].get(replica, {"error": 1})
    ]
    first = max((i for i, (t, _) in enumerate(seen) if t <= lo), default=0)
    last = min((i for i, (t, _) in enumerate(seen) if t >= hi), default=len(seen) - 1)
    steps = [n for _, n in seen[first : last + 1]]
    return max(steps[-1] - steps[0], 0) if len(steps) > 1 else 0


def side_effects(
    got: dict[str, Any],
    goes_on: tuple[str, ...],
    records: list[dict[str, Any]],
    samples: list[dict[str, Any]],
    t0: float,
    base: list[tuple[float, float]],
    others: dict[str, tuple[float, float]],
) -> dict[str, Any]:
    """While the drill lasted (`got["t"]` to `got["until"]`): each replica of `goes_on` ran
    steps, and a valid request sent meanwhile was answered 200 before it ended. Judged where
    the statement applies: within a span of the base load (`base`; a burst's backlog delays
    every answer) and apart from the other drills (`others`: name → span; a replica the
    statement counts on may be down for another). Elsewhere it is reported as not judged: in a
    short run, where the drills crowd each other; the 10-minute plan's drills are apart."""
    lo, hi = got.get("t"), got.get("until")
    if lo is None or hi is None:
        return {"ok": False, "detail": "the drill recorded no span to check its side effects"}
    crowded = [n for n, (a, b) in others.items() if a < hi and lo < b]
    if crowded or not any(a <= lo and hi <= b for a, b in base):
        why = f"overlaps {', '.join(crowded)}" if crowded else "not at the base load"
        return {"ok": True, "detail": f"side effects not judged from {lo:.0f} to {hi:.0f} s: {why}"}
    answered = sum(
        r.get("outcome") == "ok"
        and not r.get("invalid")
        and lo <= _sent_s(r, t0)
        and _ended_s(r, t0) <= hi
        for r in records
    )
    ran = {name: _steps_run(samples, name, lo, hi) for name in goes_on}
    parts = [f"{name} ran {n} steps" for name, n in ran.items()]
    detail = f"from {lo:.0f} to {hi:.0f} s, {answered} requests sent and answered 200; " + (
        ", ".join(parts)
    )
    return {"ok": answered > 0 and all(ran.values()), "detail": detail}


def holds_storm_row(tel: dict[str, Any]) -> bool:
    """Whether the replica holds more KV pages than its running rows of the campaign's load
    can: a storm row (`STORM_PROMPT`), or pages that no running row holds."""
    per_layer = tel["kv_pages_in_use"] / max(int(tel.get("attn_kept", 1)), 1)
    return bool(per_layer > ROW_PAGES_MAX * tel["queue"]["running"])


def storm_freed(got: dict[str, Any], samples: list[dict[str, Any]]) -> dict[str, Any]:
    """The storm's rows: seen while its clients were connected (else this check could not tell),
    gone from every replica within `FREE_STEPS` of its last hang-up (`got["until"]`), and not
    back within `WATCH_STEPS`."""
    lo, hi = got.get("t"), got.get("until")
    if lo is None or hi is None:
        return {"ok": False, "detail": "the storm recorded no span"}
    live = [
        (s["t"], n, tel) for s in samples for n, tel in s["replicas"].items() if "error" not in tel
    ]
    seen = any(lo <= t <= hi and holds_storm_row(tel) for t, _, tel in live)
    names = sorted({n for _, n, _ in live})
    freed = {n: _freed_after(n, [(t, tel) for t, m, tel in live if m == n], hi) for n in names}
    late = {n: f for n, f in freed.items() if f is None or f > FREE_STEPS}
    shown = ", ".join(f"{n} {'never' if f is None else f'{f} steps'}" for n, f in freed.items())
    detail = (
        f"storm rows {'seen' if seen else 'never seen'} while its clients were connected; "
        f"freed after the last hang-up: {shown} (within {FREE_STEPS} expected)"
    )
    return {"ok": seen and bool(names) and not late, "detail": detail}


def _freed_after(name: str, tels: list[tuple[float, dict[str, Any]]], hung_up: float) -> int | None:
    """Steps from the last sample at or before `hung_up` to the first one after it that holds
    no storm row; None if a storm row was still (or again) held later within `WATCH_STEPS`."""
    before = [tel["steps"] for t, tel in tels if t <= hung_up]
    after = [tel for t, tel in tels if t > hung_up]
    if not after:
        return None
    start = before[-1] if before else after[0]["steps"]
    freed = None
    for tel in after:
        steps = tel["steps"] - start
        if steps < 0 or steps > WATCH_STEPS:
            break  # a new process, or past the watch
        if holds_storm_row(tel):
            freed = None  # still held, or back
        elif freed is None:
            freed = steps
    return freed
