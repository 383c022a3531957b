"""The GPU run's replicas part (issue 19, part 4): two 7B-shaped replicas on one GPU under Ray
Serve with NVML-derived shares, and a co-tenant that takes memory in steps and gives it back.

    python bench/gpu/replicas.py --out DIR [--budget-s 170] [--dry-run]

Starts a local Ray (num_gpus=1) and the real app (deployments/app.py) with two replicas of
`random:llama-7b` in float16 at num_gpus 0.5 each, whose budgets the controller derives from
NVML (`rap.serving.budget.GpuShares`, margin = 1.2 co-tenant steps, so that each step fits
into the reserve and the replicas then give the reserve back). Clients keep both replicas
decoding. The co-tenant (bench/gpu/cotenant.py) takes 10 % of the device four times, then
frees it. Every 0.25 s: /admin/state (each replica's budget, bytes, allocator, prediction,
mask) and NVML (device-wide, per process). Writes DIR/gpu-replicas.json (the `Report` format
of measure.py, part `replicas`) after every second of samples; the figures are
`replicas_analysis.summary`. On a GPU a hard deadline (`--budget-s`) cuts the run short; Ray
and the co-tenant are always shut down (after SIGTERM too).

`--dry-run` (or no CUDA): the same code on the CPU with `random:toy` and a co-tenant of host
memory on a simulated device, whose shares the bench itself pushes as operator budgets
(/admin/budget): it checks Ray, the app, the random model, the clients, the sampling, the
co-tenant, the figures and the output format; nothing is measured. A dry run has no deadline:
each phase lasts its seconds and then until what it is for has happened (a request answered, each
step's budgets seen moved), however slow the machine is.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import replicas_analysis as analysis
from budget import hold
from common import Report, cuda, environment
from replicas_probes import (
    ADMIN,
    Clients,
    Cotenant,
    Sampler,
    http,
    nvml_reading,
    replica_log_tails,
)

GIB = 2**30
CLEANUP_S = 20.0
"""Seconds kept back from --budget-s for shutting the co-tenant, Serve and Ray down."""
STEP_SAMPLES = 400
"""Dry run: reads of the app's state (samples or failed reads) after a co-tenant step without
its budgets seen moved, after which the run goes on without that figure (a broken budget path
must not hold the run forever; counted in reads, not seconds, so that a slow machine gets as
many chances as a fast one)."""


class Deadline(Exception):
    """The run's time is up (SIGALRM) or it was told to stop (SIGTERM): stop measuring, shut
    down, keep what was measured."""


def alarm_s(budget_s: float, gpu: bool) -> float | None:
    """When the GPU run's hard deadline fires (seconds from the start, the shutdown's time kept
    back); None for a dry run, which has no deadline."""
    return max(budget_s - CLEANUP_S, 1.0) if gpu else None


def plan(args: argparse.Namespace, gpu: bool) -> dict[str, Any]:
    """The run's shape: model, clients, phase lengths (GPU, or a short CPU dry run)."""
    if gpu:
        return dict(
            model="random:llama-7b",
            dtype="float16",
            clients=12,
            prompt=1024,
            max_tokens=192,
            baseline_s=6.0,
            hold_s=args.hold_s,
            regrow_s=14.0,
            request_timeout_s=120.0,
        )
    return dict(
        model="random:toy",
        dtype="float32",
        clients=2,
        prompt=64,
        max_tokens=8,
        baseline_s=3.0,
        hold_s=min(args.hold_s, 4.0),
        regrow_s=5.0,
        request_timeout_s=600.0,  # a loaded CPU: a backstop for a lost answer, not a budget
    )


def app_config(shape: dict[str, Any], gpu: bool, margin_bytes: int) -> dict[str, Any]:
    """Two replicas sharing GPU 0 (Ray fractions), budgets from NVML, the random planner (a
    random model has no block scores; which blocks go does not change bytes or time)."""
    replica = {"num_gpus": 0.5, "num_cpus": 1.0} if gpu else {"num_cpus": 0.5}
    return {
        "model": shape["model"],
        "dtype": shape["dtype"],
        "device": "cuda" if gpu else "cpu",
        "policy": None,
        "planner": "random",
        "replicas": [{"name": f"replica-{i}", **replica} for i in range(2)],
        "engine": {"max_batch_size": 16, "target_seq": 2048, "grow_after_s": 2.0}
        if gpu
        else {"max_batch_size": 4, "target_seq": 256, "grow_after_s": 1.0},
        "telemetry_period_s": 0.25,
        "gpu_margin_gib": margin_bytes / GIB,
        "controller": {"shares": {"margin_bytes": margin_bytes, "dwell_s": 4.0}},
        "drain_timeout_s": 5.0,
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Run:
    """One run: the cluster, the app, the co-tenant, the sampler and the clients, each shut
    down by `close` whatever state the run stopped in."""

    def __init__(self, args: argparse.Namespace, gpu: bool, report: Report) -> None:
        self.args, self.gpu, self.report = args, gpu, report
        self.part = report.part("replicas")
        self.shape = plan(args, gpu)
        self.cotenant: Cotenant | None = None
        self.sampler: Sampler | None = None
        self.clients: Clients | None = None
        self.ray_up = False
        self.url = ""
        self.base: dict[str, int] = {}
        self.reads_at_step = 0
        total = nvml_reading()["total"] if gpu else 0  # type: ignore[index]
        self.margin = int(1.2 * args.step_frac * total) if gpu else None

    def start_app(self) -> None:
        import ray  # lazy: heavy (Ray), and only once the report exists
        from ray import serve  # lazy: heavy (Ray Serve)

        from deployments.app import build_app  # lazy: imports Ray Serve
        from rap.ops.ray_env import patient_serve_env  # lazy: with the Ray imports above

        os.environ["RAP_ADMIN_TOKEN"] = ADMIN  # inherited by Ray's workers
        os.environ.pop("RAP_API_KEY", None)  # the clients send none
        began = time.monotonic()
        patient_serve_env()  # a loaded machine's proxy starts slowly
        ray.init(
            address="local",
            num_cpus=os.cpu_count() if self.gpu else 2,
            num_gpus=1 if self.gpu else 0,
            include_dashboard=False,
            log_to_driver=False,
        )
        self.ray_up = True
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        self.part["ray_start_s"] = time.monotonic() - began
        config = app_config(self.shape, self.gpu, self.margin or 0)
        self.part["app_config"] = config
        self.report.save()
        serve.run(build_app(config), name="rap", route_prefix="/")
        self.url = f"http://127.0.0.1:{port}"
        self.part["deploy_s"] = time.monotonic() - began - self.part["ray_start_s"]
        print(f"app up in {self.part['deploy_s']:.1f} s ({self.shape['model']})", flush=True)
        self.report.save()

    def check_chat(self) -> None:
        """One chat request: the chat path works with the random model's tokenizer."""
        body = {
            "model": self.shape["model"],
            "max_tokens": 8,
            "messages": [{"role": "user", "content": "Say something."}],
        }
        url = f"{self.url}/v1/chat/completions"
        status, out = http(url, body, timeout=self.shape["request_timeout_s"])
        self.part["chat"] = {
            "status": status,
            "usage": out.get("usage"),
            "mask": out.get("system_fingerprint"),
        }

    def start_load(self) -> None:
        """Step sizes from the device (simulated on a CPU: the replicas' budgets are 60 % of
        it), then the co-tenant (its CUDA context before the baseline), sampler and clients."""
        self.base = self.replica_budgets()
        total = nvml_reading()["total"] if self.gpu else int(sum(self.base.values()) / 0.6)  # type: ignore[index]
        step = int(self.args.step_frac * total)
        self.part["device"] = {
            "total_bytes": total,
            "step_bytes": step,
            "margin_bytes": self.margin,
            "simulated": not self.gpu,
        }
        self.cotenant = Cotenant("cuda" if self.gpu else "cpu", step)
        self.sampler = Sampler(self.url, self.args.poll_s, self.cotenant)
        self.clients = Clients(self.url, self.shape)
        self.sampler.start()
        self.clients.start()

    def replica_budgets(self) -> dict[str, int]:
        """Each replica's budget once every replica reports one (a loaded machine's replicas
        may not have sent telemetry yet), or what was there after STEP_SAMPLES reads."""
        want = len(app_config(self.shape, self.gpu, 0)["replicas"])
        base: dict[str, int] = {}
        for _ in range(STEP_SAMPLES):
            status, state = http(f"{self.url}/admin/state")
            tels = state["replicas"] if status == 200 else {}
            base = {n: t["budget_bytes"] for n, t in tels.items() if "budget_bytes" in t}
            if len(base) >= want:
                break
            time.sleep(self.args.poll_s)
        return base

    def phases(self) -> None:
        """Baseline, the co-tenant's steps (each held), the free, the regrowth."""
        assert self.cotenant is not None
        self.hold(self.shape["baseline_s"], self.baseline_seen)
        for _ in range(self.args.steps):
            event = self.cotenant.command("alloc")
            print(f"co-tenant: {event}", flush=True)
            self.step_taken()
            self.hold(self.shape["hold_s"], self.step_seen)
        print(f"co-tenant: {self.cotenant.command('free')}", flush=True)
        self.step_taken()
        self.hold(self.shape["regrow_s"], self.step_seen)
        self.part["status"] = "done"

    def step_taken(self) -> None:
        assert self.sampler is not None
        self.reads_at_step = self.sampler.reads
        self.simulate_shares()

    def hold(self, seconds: float, ready: Any) -> None:
        """A phase: `seconds` on a GPU; in a dry run, then also until `ready()`."""
        hold(seconds, self.save, None if self.gpu else ready)

    def baseline_seen(self) -> bool:
        """A request answered and a sample of every replica (a step's figures need one)."""
        assert self.clients is not None and self.sampler is not None
        answered = self.clients.summary()["by_status"].get("200", 0) > 0
        names = set(self.base)
        return answered and any(names <= s["replicas"].keys() for s in self.sampler.samples)

    def step_seen(self) -> bool:
        """The last co-tenant step's budgets seen moved by a sample (its `budget_s`), or
        STEP_SAMPLES reads since it without (noted in the part's `waits`)."""
        assert self.cotenant is not None and self.sampler is not None
        samples, events = list(self.sampler.samples), list(self.cotenant.events)
        steps = [e for e in events if e["event"] in ("alloc", "free") and e.get("ok", True)]
        if not steps:
            return True
        rows = analysis.reactions(samples, events, self.margin)
        if len(rows) == len(steps) and rows[-1]["budget_s"] is not None:
            return True
        if self.sampler.reads - self.reads_at_step < STEP_SAMPLES:
            return False
        note = f"{steps[-1]['event']} at {steps[-1]['t']:.1f}: budgets not seen moved"
        self.part.setdefault("waits", []).append(f"{note} in {STEP_SAMPLES} reads")
        return True

    def simulate_shares(self) -> None:
        """Dry run only: the shares NVML would give on the simulated device, pushed as operator
        budgets (each replica's start budget minus its half of the co-tenant's bytes)."""
        if self.gpu or self.cotenant is None:
            return
        for name, base in self.base.items():
            gib = max(base - self.cotenant.held // len(self.base), 1 << 20) / GIB
            http(f"{self.url}/admin/budget", {"replica": name, "gib": gib})

    def save(self) -> None:
        samples = list(self.sampler.samples) if self.sampler else []
        events = list(self.cotenant.events) if self.cotenant else []
        summary = analysis.summary(samples, events, self.margin)
        self.part.update(
            samples=samples, cotenant_events=events, summary=summary, rows=summary["reactions"]
        )
        if self.clients:
            self.part["requests"] = self.clients.summary()
        if self.sampler:
            self.part["sample_errors"] = self.sampler.errors[-20:]
        self.report.save()

    def close(self) -> None:
        """Everything down, each step on its own (one failing does not keep the rest up)."""
        for stop in (self.clients, self.sampler):
            if stop is not None:
                stop.stop.set()
        if self.url:
            try:
                _, state = http(f"{self.url}/admin/state", timeout=5.0)
                self.part["controller_decisions"] = state["controller"].get("decisions")
            except Exception as exc:
                self.part["controller_decisions"] = f"unreadable: {exc}"
        if self.cotenant is not None:
            self.cotenant.close()
        if self.part.get("status") != "done":
            self.part["replica_logs"] = replica_log_tails()
        if self.ray_up:
            import ray  # lazy: heavy (Ray); already imported by start_app
            from ray import serve  # lazy: heavy (Ray Serve); already imported

            try:
                serve.shutdown()
            finally:
                ray.shutdown()
        self.save()


def _stop(signum: int, frame: Any) -> None:
    raise Deadline("deadline" if signum == signal.SIGALRM else signal.Signals(signum).name)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for gpu-replicas.json")
    ap.add_argument(
        "--budget-s", type=float, default=170.0, help="hard deadline, all included (GPU only)"
    )
    ap.add_argument("--dry-run", action="store_true", help="random:toy on the CPU")
    ap.add_argument("--steps", type=int, default=4, help="co-tenant steps")
    ap.add_argument("--step-frac", type=float, default=0.1, help="of the device per step")
    ap.add_argument("--hold-s", type=float, default=9.0, help="seconds each step is held")
    ap.add_argument("--poll-s", type=float, default=0.25, help="sampling period")
    args = ap.parse_args()
    gpu = cuda() and not args.dry_run
    if not gpu:
        print(
            "CUDA is absent (or --dry-run): replicas dry run on the CPU with random:toy and a "
            "co-tenant of host memory on a simulated device; it checks Ray, the app, the "
            "random model, clients, sampling, the co-tenant, figures and output format; "
            "nothing is measured",
            flush=True,
        )
    args.out.mkdir(parents=True, exist_ok=True)
    report = Report(args.out / "gpu-replicas.json", environment())
    run = Run(args, gpu, report)
    run.part.update(plan=run.shape, dry_run=not gpu)
    signal.signal(signal.SIGALRM, _stop)
    signal.signal(signal.SIGTERM, _stop)  # run.sh's backstop `timeout`: shut down as well
    alarm = alarm_s(args.budget_s, gpu)
    run.part["deadline_s"] = alarm
    if alarm is not None:
        signal.setitimer(signal.ITIMER_REAL, alarm)
    began = time.monotonic()
    try:
        run.start_app()
        run.check_chat()
        run.start_load()
        run.phases()
    except Deadline as stop:
        run.part["status"] = f"partial ({stop} after {time.monotonic() - began:.0f} s)"
    except Exception:
        run.part["status"] = "error"
        run.part["error"] = traceback.format_exc()
        print(f"replicas: error\n{run.part['error']}", flush=True)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        run.close()
        run.part["seconds"] = time.monotonic() - began
        report.save()
    print(
        f"replicas: {run.part['status']} in {run.part['seconds']:.0f} s; wrote {report.path}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
