"""The campaign's live app and its fault drills (`rap campaign`, rap/cli/campaign.py).

`Harness` talks to the app (HTTP with the admin token; its samples of `/admin/state`); each
drill does one thing to it and checks its own outcome (`rap.ops.campaign.EVENTS` states them):
a replica actor killed (Ray), a replica's process stopped (SIGSTOP) and continued, the
controller killed, a storm of clients hanging up mid-stream, the device-memory reading failing
(the fault folder, `rap.serving.faults`). Each returns {"t", "ok", "detail", "until"}: when
it began and ended (seconds of run time; `until` None if it never ended), for the judge to check
what it states happens meanwhile (`rap.ops.campaign_checks`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from rap.core.constants import GIB
from rap.core.errors import RapError
from rap.ops.campaign import Observed
from rap.ops.campaign_checks import STORM_MAX_TOKENS, STORM_PROMPT

MODEL = "SmolLM2-135M-Instruct"
REPLICAS = ("replica-0", "replica-1")


class Harness:
    """The live app as the campaign drives it: HTTP with the admin token, Ray for faults."""

    def __init__(self, url: str, admin: str, key: str, fault_dir: Path) -> None:
        self.url, self.admin, self.key, self.fault_dir = url, admin, key, fault_dir
        self.obs = Observed()
        self.t0 = time.time()
        self.stop = threading.Event()

    def state(self) -> dict[str, Any]:
        req = urllib.request.Request(f"{self.url}/admin/state")
        req.add_header("Authorization", f"Bearer {self.admin}")
        with urllib.request.urlopen(req, timeout=10) as resp:
            return dict(json.loads(resp.read()))

    def now(self) -> float:
        return time.time() - self.t0

    def sample(self, period_s: float = 0.5) -> None:
        while not self.stop.wait(period_s):
            with contextlib.suppress(OSError, ValueError):
                s = self.state()
                epoch = s["controller"].get("epoch")
                self.obs.samples.append(
                    {"t": self.now(), "replicas": s["replicas"], "epoch": epoch}
                )

    def set_budget(self, replica: str, nbytes: int) -> None:
        """The step counts from when it is sent (the co-tenant's moment), not when the
        replica's answer comes back (it re-plans with the controller first); both recorded."""
        sent = self.now()
        body = json.dumps({"replica": replica, "gib": nbytes / GIB}).encode()
        req = urllib.request.Request(f"{self.url}/admin/budget", data=body, method="POST")
        req.add_header("Authorization", f"Bearer {self.admin}")
        req.add_header("Content-Type", "application/json")
        self.obs.budget_steps.append((sent, replica, nbytes))
        with urllib.request.urlopen(req, timeout=30):
            pass
        self.obs.admin_latency_s.append(self.now() - sent)

    def tel(self, replica: str) -> dict[str, Any]:
        """The replica's telemetry from the latest sample that has it (or {"error"})."""
        for s in reversed(self.obs.samples):
            if replica in s["replicas"]:
                return dict(s["replicas"][replica])
        return {"error": "no sample"}

    def wait_for(self, check: Any, timeout_s: float) -> Any:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            got = check()
            if got:
                return got
            time.sleep(0.5)
        return None


def _actor_name(part: str) -> str:
    import ray  # lazy: heavy (ray)

    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
    found = [n for n in names if part in n]
    if not found:
        raise RapError(f"no live actor named like {part!r}", expected=f"one of {names}")
    return found[0]


def _replica_pid(name: str) -> int:
    """The worker process that runs replica `name` (Ray titles it `ray::ServeReplica:...`)."""
    import psutil  # lazy: heavy (psutil, Ray's dependency)

    title = re.compile(rf"^ray::ServeReplica:[^:\s]+:{re.escape(name)}(?![\w-])")
    seen = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if cmd.startswith("ray::"):
            seen.append(cmd[:60])
        if title.match(cmd):
            return int(proc.pid)
    raise RapError(
        f"no process runs {name}", expected=f"a ray::ServeReplica:rap:{name} among {seen}"
    )


def kill_replica(h: Harness) -> dict[str, Any]:
    import ray  # lazy: heavy (ray)

    before = h.tel("replica-0").get("steps", 0)
    t = h.now()
    ray.kill(ray.get_actor(_actor_name("rap#replica-0#"), namespace="serve"), no_restart=True)

    def back() -> Any:
        tel = h.tel("replica-0")
        return "error" not in tel and tel["steps"] < before and tel

    tel = h.wait_for(back, 180)
    until = h.now() if tel else None
    if until is not None:  # budget steps sent meanwhile reach the new process only once it is up
        h.obs.paused.append(("replica-0", t, until))
    detail = f"killed at {t:.0f} s with {before} steps; " + (
        f"answered again at {h.now():.0f} s with {tel['steps']} steps (a new process)"
        if tel
        else "never answered again within 180 s"
    )
    return {"t": t, "ok": bool(tel), "detail": detail, "until": until}


def sigstop_replica(h: Harness, seconds: float) -> dict[str, Any]:
    pid, before, t = _replica_pid("replica-1"), h.tel("replica-1").get("steps", 0), h.now()
    os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(seconds)
    finally:
        os.kill(pid, signal.SIGCONT)
        until = h.now()
        h.obs.paused.append(("replica-1", t, until))
    tel = h.wait_for(lambda: (x := h.tel("replica-1")) and "error" not in x and x, 60)
    same = bool(tel) and tel["steps"] >= before  # a restart would reset the counter
    detail = f"pid {pid} stopped {seconds:.0f} s at {t:.0f} s; " + (
        f"answering again, same process ({before} → {tel['steps']} steps)"
        if same
        else f"not the same process after ({tel})"
    )
    return {"t": t, "ok": same, "detail": detail, "until": until}


def kill_controller(h: Harness) -> dict[str, Any]:
    import ray  # lazy: heavy (ray)

    before, t = h.state()["controller"]["epoch"], h.now()
    ray.kill(ray.get_actor(_actor_name("RapController"), namespace="serve"), no_restart=True)
    after = h.wait_for(
        lambda: (e := h.state()["controller"].get("epoch")) and e > before and e, 120
    )
    until = h.now() if after else None
    detail = f"epoch {before} killed at {t:.0f} s; " + (
        f"successor at epoch {after} by {until:.0f} s" if after else "no successor in 120 s"
    )
    return {"t": t, "ok": bool(after), "detail": detail, "until": until}


def disconnect_storm(h: Harness, clients: int = 40) -> dict[str, Any]:
    """Open `clients` streams, each hangs up after its first chunk; `until` is the last hang-up.
    Their long prompt (`STORM_PROMPT`) makes their rows tell from the load's in the samples, so
    the judge sees them freed within a few steps (`campaign_checks.storm_freed`); idle at the
    end (`idle_check`)."""
    import http.client  # lazy: stdlib, only here

    host, port = h.url.split("//")[1].split(":")
    ask = {"model": MODEL, "prompt": STORM_PROMPT, "max_tokens": STORM_MAX_TOKENS, "stream": True}
    body = json.dumps(ask)

    def one(_: int) -> str:
        """How this client left: after the first chunk, refused, or while still waiting."""
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        try:
            headers = {"Authorization": f"Bearer {h.key}", "Content-Type": "application/json"}
            conn.request("POST", "/v1/completions", body, headers)
            resp = conn.getresponse()
            if resp.status != 200:
                return "refused"
            return "mid-stream" if resp.readline().startswith(b"data: ") else "refused"
        except OSError:  # no first byte within 60 s (a saturated server): it gives up too
            return "while waiting"
        finally:
            conn.close()  # hang up, whatever happened

    t = h.now()
    with ThreadPoolExecutor(clients) as pool:
        left = list(pool.map(one, range(clients)))
    until = h.now()
    counts = {k: left.count(k) for k in ("mid-stream", "while waiting", "refused")}
    detail = f"{clients} clients hung up by {until:.0f} s: " + ", ".join(
        f"{n} {k}" for k, n in counts.items()
    )
    return {"t": t, "ok": counts["mid-stream"] > 0, "detail": detail, "until": until}


def device_memory_fault(h: Harness, seconds: float) -> dict[str, Any]:
    before = {n: h.tel(n) for n in REPLICAS}
    t, flag = h.now(), h.fault_dir / "device_memory"
    flag.touch()
    try:
        time.sleep(seconds)
    finally:
        flag.unlink()
        until = h.now()
    time.sleep(2)
    after = {n: h.tel(n) for n in REPLICAS}
    grew = sum(after[n].get("errors", 0) - before[n].get("errors", 0) for n in REPLICAS)
    same = all(after[n].get("steps", 0) >= before[n].get("steps", 0) for n in REPLICAS)
    detail = f"{grew} contained errors counted; " + (
        "no replica restarted" if same else "a restart"
    )
    return {"t": t, "ok": grew > 0 and same, "detail": detail, "until": until}


def idle_check(h: Harness, storm: dict[str, Any] | None) -> dict[str, Any]:
    """After the load: every replica holds no running row and no KV page (the storm's)."""

    def idle() -> Any:
        tels = {n: h.tel(n) for n in REPLICAS}
        return (
            all(
                "error" not in t and t["queue"]["running"] == 0 and t["kv_pages_in_use"] == 0
                for t in tels.values()
            )
            and tels
        )

    tels = h.wait_for(idle, 120)
    if storm is None:
        return {"ok": False, "detail": "did not run"}
    held = "none" if tels else {n: h.tel(n).get("kv_pages_in_use") for n in REPLICAS}
    detail = f"{storm['detail']}; after the load, pages held: {held}"
    return {**storm, "ok": bool(tels) and bool(storm["ok"]), "detail": detail}
