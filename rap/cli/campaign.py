"""`rap campaign`: load, a budget shock and faults on a live app, judged.

    rap campaign [--duration 600] [--shock-gib 0.45] --out DIR

Parse → build (a local Ray cluster, the app: two replicas of the default model, an API key, an
admin token, a fault folder) → run (capacity in a closed loop; locust headless with the plan's
shape; the shock and each fault at its time, `/admin/state` sampled) → report (DIR/campaign.json.gz,
DIR/campaign.md, DIR/timeline.png, locust's CSV and JSON). Exit 0 when every case held, else 1.
`rap.ops.campaign` holds the plan and the judging, `rap.ops.locustfile` the load.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import os
import secrets
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from rap.cli.drills import (
    MODEL,
    REPLICAS,
    Harness,
    device_memory_fault,
    disconnect_storm,
    idle_check,
    kill_controller,
    kill_replica,
    sigstop_replica,
)
from rap.core.constants import GIB
from rap.core.errors import RapError
from rap.ops import campaign, campaign_report
from rap.ops.campaign import Plan

PORT = 8766


def add_commands(sub: Any) -> None:
    p = sub.add_parser("campaign", help="load, a budget shock and faults on a live app, judged")
    p.add_argument("--duration", type=float, default=600.0, help="seconds of load (default 600)")
    p.add_argument("--shock-gib", type=float, default=0.45, help="both budgets in the shock")
    p.add_argument("--capacity-s", type=float, default=30.0, help="closed-loop capacity run")
    p.add_argument("--pacing-s", type=float, default=16.0, help="seconds between a user's calls")
    p.add_argument("--out", required=True, type=Path, help="folder for the report")
    p.add_argument("--port", type=int, default=PORT)
    p.set_defaults(func=cmd_campaign)


CAPACITY_TRIES = 4
"""Capacity runs at most (each twice as long as the one before) before the campaign gives up."""


def capacity(h: Harness, seconds: float, clients: int, out: Path) -> float:
    """Requests per second the app completes in a closed loop of `clients` locust users sending
    the campaign's own mix (streamed and whole, every prompt and length) with no pause between
    requests: the same requests, and the same load generator on the same cores, as the run."""
    folder = out / "capacity"
    folder.mkdir(parents=True, exist_ok=True)
    for _ in range(CAPACITY_TRIES):
        campaign.clear_records(folder)
        run_locust(h, [[seconds, clients]], 0.0, folder, timeout_s=seconds + 300)
        records = campaign.read_records(folder)
        answers = campaign.closed_loop_answers(records, seconds)
        if answers >= campaign.MIN_CAPACITY_ANSWERS:
            return campaign.closed_loop_rate(records, seconds)
        print(
            f"capacity: {answers} answers counted over {seconds:g} s, fewer than "
            f"{campaign.MIN_CAPACITY_ANSWERS}; measuring again over {2 * seconds:g} s",
            flush=True,
        )
        seconds *= 2
    raise RapError(
        f"the app answered too few requests to measure its capacity ({answers} counted over "
        f"the last {seconds / 2:g} s)",
        f"at least {campaign.MIN_CAPACITY_ANSWERS}",
        "run the campaign on a less loaded machine, or with a longer --capacity-s",
    )


def run_events(h: Harness, plan: Plan, starts: dict[str, int], shock_bytes: int) -> None:
    """The shock and every event at its time, each event in a thread of its own (a drill that
    waits for its outcome must not delay the next); results into h.obs.events."""
    actions = {
        "kill-replica": lambda e: kill_replica(h),
        "sigstop-replica": lambda e: sigstop_replica(h, e.seconds),
        "kill-controller": lambda e: kill_controller(h),
        "disconnect-storm": lambda e: disconnect_storm(h),
        "device-memory-fault": lambda e: device_memory_fault(h, e.seconds),
    }

    def drill(event: Any) -> None:
        try:
            h.obs.events[event.name] = actions[event.name](event)
        except Exception as exc:  # the harness's own failure is a failed case, not a crash
            detail = f"{type(exc).__name__}: {exc}"
            h.obs.events[event.name] = {"t": h.now(), "ok": False, "detail": detail}

    lo, hi = plan.shock_s()
    timetable: list[tuple[float, str, Any]] = [(lo, "shock", None), (hi, "shock-end", None)]
    timetable += [(plan.at_s(e), e.name, e) for e in plan.events]
    running = []
    for at, name, event in sorted(timetable, key=lambda x: x[0]):
        if h.stop.wait(max(0.0, at - h.now())):
            break
        if event is None:  # the co-tenant takes (gives back) memory on both replicas at once
            with ThreadPoolExecutor(len(REPLICAS)) as pool:
                nbytes = [shock_bytes if name == "shock" else starts[r] for r in REPLICAS]
                list(pool.map(h.set_budget, REPLICAS, nbytes))
            continue
        running.append(threading.Thread(target=drill, args=(event,), daemon=True))
        running[-1].start()
    for t in running:
        t.join(timeout=300)


def run_locust(
    h: Harness, shape: list[list[float]], pacing_s: float, out: Path, timeout_s: float
) -> int | None:
    """locust headless with `shape` ([[until_s, users], ...]); the number of requests it
    counted, from the statistics it writes once every user has stopped (`--json-file`): its CSV
    is rewritten every second while it runs, so the requests of its last second can be missing
    from it."""
    # Its path only: importing it would let gevent patch this process (Ray's).
    locustfile = Path(campaign.__file__).with_name("locustfile.py")
    env = {
        **os.environ,
        "RAP_CAMPAIGN_OUT": str(out),
        "RAP_API_KEY": h.key,
        "RAP_CAMPAIGN_SHAPE": json.dumps(shape),
        "RAP_CAMPAIGN_PACING_S": str(pacing_s),
        "RAP_CAMPAIGN_MODEL": MODEL,
    }
    cmd = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(locustfile),
        "--headless",
        "--host",
        h.url,
        "--csv",
        str(out / "locust"),
        "--json-file",
        str(out / "locust"),
        "--loglevel",
        "WARNING",
        "--only-summary",
        "--stop-timeout",
        "150",  # users finish the request they run: a hang is seen, not killed
    ]
    with open(out / "locust.log", "w") as log:
        subprocess.run(
            cmd,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=timeout_s,
            check=False,
        )
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        entries = json.loads((out / "locust.json").read_text())  # one per request name
        return sum(int(e["num_requests"]) for e in entries)  # failures are among them
    return None


def cmd_campaign(args: argparse.Namespace) -> int:
    from rap.cli.bench import _deploy, _start_ray, _stop_ray  # lazy: heavy (ray, torch)

    args.out.mkdir(parents=True, exist_ok=True)
    campaign.clear_records(args.out)
    admin, key = secrets.token_urlsafe(16), secrets.token_urlsafe(16)
    fault_dir = args.out / "faults"
    fault_dir.mkdir(exist_ok=True)
    # Inherited by Ray's workers; put back afterwards, so that a caller in the same process
    # (a test run) does not serve its next app behind this campaign's key.
    names = ("RAP_ADMIN_TOKEN", "RAP_API_KEY", "RAP_FAULT_DIR")
    saved = {n: os.environ.get(n) for n in names}
    os.environ.update(RAP_ADMIN_TOKEN=admin, RAP_API_KEY=key, RAP_FAULT_DIR=str(fault_dir))
    url = f"http://127.0.0.1:{args.port}"
    try:
        _start_ray(args.port)
        _deploy(app_config(), url)
        h = Harness(url, admin, key, fault_dir)
        starts = {n: h.state()["replicas"][n]["budget_bytes"] for n in REPLICAS}
        cap = capacity(h, args.capacity_s, clients=16, out=args.out)
        plan = Plan(args.duration, cap, pacing_s=args.pacing_s)
        print(f"capacity {cap:.2f} req/s; load shape {plan.shape()}", flush=True)
        result = _run(h, plan, starts, int(args.shock_gib * GIB), args.out)
    except KeyboardInterrupt:  # Ctrl-C: no traceback; Ray stops below, nothing is judged
        print("rap campaign: interrupted, nothing judged; stopping Ray", file=sys.stderr)
        return 130
    finally:
        _stop_ray()
        for n, value in saved.items():
            if value is None:
                os.environ.pop(n, None)
            else:
                os.environ[n] = value
    _report(args.out, result, plan, starts, args)
    return 0 if result["ok"] else 1


def app_config() -> dict[str, Any]:
    """The campaign's app: the default model and policy, two replicas, drains of 60 s."""
    replicas = [{"name": n, "num_cpus": 0.5} for n in REPLICAS]
    return {
        "model": "smollm2",
        "replicas": replicas,
        "engine": {"max_batch_size": 8},
        "drain_timeout_s": 60.0,
        "num_threads": 1,
    }


def _run(h: Harness, plan: Plan, starts: dict[str, int], shock: int, out: Path) -> dict[str, Any]:
    from tqdm import tqdm  # lazy: heavy (tqdm)

    h.t0 = time.time()
    threads = [
        threading.Thread(target=h.sample, daemon=True),
        threading.Thread(target=run_events, args=(h, plan, starts, shock), daemon=True),
    ]
    for t in threads:
        t.start()
    counted: list[int | None] = []

    def load() -> None:
        counted.append(run_locust(h, plan.shape(), plan.pacing_s, out, plan.duration_s + 300))

    runner = threading.Thread(target=load)
    runner.start()
    with tqdm(total=round(plan.duration_s), desc="rap campaign", unit="s") as bar:
        while runner.is_alive():
            runner.join(1.0)
            bar.n = min(round(h.now()), bar.total)
            bar.refresh()
    threads[1].join(timeout=300)
    h.obs.events["disconnect-storm"] = idle_check(h, h.obs.events.get("disconnect-storm"))
    h.stop.set()
    records = campaign.read_records(out)
    counted_n = counted[0] if counted else None
    return campaign.judge(records, counted_n, h.obs, starts, h.t0, plan) | {
        "obs": h.obs,
        "records": records,
    }


def _report(
    out: Path, result: dict[str, Any], plan: Plan, starts: dict[str, int], args: argparse.Namespace
) -> None:
    obs, records = result.pop("obs"), result.pop("records")
    head = (
        f"`rap campaign --duration {args.duration:.0f} --shock-gib {args.shock_gib}`, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    )
    doc = {
        "plan": {
            "duration_s": plan.duration_s,
            "capacity_rps": plan.capacity_rps,
            "shape": plan.shape(),
            "shock_s": plan.shock_s(),
            "events": [vars(e) for e in plan.events],
            "base_load": vars(campaign.BASE_LOAD) | {"windows_s": plan.base_windows()},
        },
        "budget_starts": starts,
        "result": result,
        "samples": obs.samples,
        "budget_steps": obs.budget_steps,
        "paused": obs.paused,
        "events": obs.events,  # each drill's span and result: enough to judge the run again
        "requests": records,
    }
    raw = json.dumps(doc, separators=(",", ":"), default=str).encode()
    (out / "campaign.json.gz").write_bytes(gzip.compress(raw, compresslevel=9, mtime=0))
    campaign.clear_records(out)  # in the document now
    text = campaign_report.markdown(result, plan, head)
    (out / "campaign.md").write_text(text + "\n")
    campaign_report.timeline(obs, records, plan, starts, out / "timeline.png")
    print(text)
