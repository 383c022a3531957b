"""What the replicas part (replicas.py) drives and reads: the app's HTTP API, NVML, the
clients that keep rows running and the co-tenant subprocess (bench/gpu/cotenant.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from common import cuda

HERE = Path(__file__).resolve().parent
ADMIN = "rap-gpu-replicas"  # throwaway admin token, for the run's local cluster only


def http(url: str, body: dict[str, Any] | None = None, timeout: float = 30.0) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method="POST" if data else "GET")
    req.add_header("Content-Type", "application/json")
    req.add_header("Authorization", f"Bearer {ADMIN}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def nvml_reading() -> dict[str, Any] | None:
    """Device 0's used/free bytes and each compute process's use (pid → bytes; in a
    container NVML may name host pids, which then match no replica)."""
    if not cuda():
        return None
    import pynvml  # lazy: only on a GPU (nvidia-ml-py)

    pynvml.nvmlInit()
    h = pynvml.nvmlDeviceGetHandleByIndex(0)
    info = pynvml.nvmlDeviceGetMemoryInfo(h)
    try:
        procs = pynvml.nvmlDeviceGetComputeRunningProcesses(h)
        per_pid: dict[str, int] | None = {str(p.pid): p.usedGpuMemory for p in procs}
    except pynvml.NVMLError:  # not supported in some containers: the device-wide figures stay
        per_pid = None
    return {
        "used": int(info.used),
        "free": int(info.free),
        "total": int(info.total),
        "per_pid": per_pid,
    }


def replica_log_tails(chars: int = 3000) -> dict[str, str]:
    """The end of each Serve replica's log from this run's Ray session (the driver sees no
    worker output: log_to_driver is off), for a run whose app failed or was cut off."""
    logs = Path("/tmp/ray/session_latest/logs/serve")
    return {p.name: p.read_text(errors="replace")[-chars:] for p in sorted(logs.glob("replica_*"))}


def replica_row(tel: dict[str, Any]) -> dict[str, Any]:
    """One replica's figures from its telemetry: `held` is what its share must bound."""
    proc = tel.get("process") or {}
    own = tel["weight_bytes"] + tel["kv_bytes_reserved"]
    allocated = proc.get("allocated_bytes")
    return {
        "budget": tel["budget_bytes"],
        "held": allocated if allocated is not None else own,
        "peak": proc.get("peak_allocated_bytes"),
        "allocated": allocated,
        "reserved": proc.get("reserved_bytes"),
        "predicted": tel.get("predicted_bytes", 0),
        "weight": tel["weight_bytes"],
        "kv_reserved": tel["kv_bytes_reserved"],
        "kv_in_use": tel["kv_bytes_in_use"],
        "attn_kept": tel["attn_kept"],
        "mlp_kept": tel["mlp_kept"],
        "running": tel["queue"]["running"],
        "waiting": tel["queue"]["waiting"],
        "preemptions": tel["preemptions"],
        "pid": proc.get("pid"),
    }


class Sampler(threading.Thread):
    """Samples /admin/state and NVML every `period_s` into `samples` (module doc)."""

    def __init__(self, url: str, period_s: float, cotenant: Any) -> None:
        super().__init__(daemon=True, name="sampler")
        self.url, self.period_s, self.cotenant = url, period_s, cotenant
        self.samples: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self.reads = 0
        """Reads tried, samples and failures alike (a dry run's phases count them)."""
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            began = time.monotonic()
            try:
                self.samples.append(self.sample())
            except Exception as exc:  # a slow or failing read: note it, sample on
                self.errors.append(f"{time.time():.1f} {type(exc).__name__}: {exc}"[:300])
            self.reads += 1
            self.stop.wait(max(0.0, self.period_s - (time.monotonic() - began)))

    def sample(self) -> dict[str, Any]:
        t = time.time()
        status, state = http(f"{self.url}/admin/state", timeout=5.0)
        reps = state.get("replicas", {}) if status == 200 else {}
        return {
            "t": t,
            "cotenant_bytes": self.cotenant.held,
            "nvml": nvml_reading(),
            "replicas": {n: replica_row(r) for n, r in reps.items() if "budget_bytes" in r},
        }


class Clients:
    """Closed-loop completion clients (ignore_eos: equal work) that keep rows running."""

    def __init__(self, url: str, shape: dict[str, Any]) -> None:
        self.url, self.shape = url, shape
        self.results: list[dict[str, Any]] = []
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=self._loop, args=(i,), daemon=True)
            for i in range(shape["clients"])
        ]

    def start(self) -> None:
        for th in self.threads:
            th.start()

    def _loop(self, i: int) -> None:
        prompt = f"The quick brown fox jumps over the lazy dog {i}. " * 64
        body = {
            "model": self.shape["model"],
            "prompt": prompt[: self.shape["prompt"]],
            "max_tokens": self.shape["max_tokens"],
            "ignore_eos": True,
            "temperature": 0,
        }
        while not self.stop.is_set():
            began = time.time()
            try:
                url, timeout_s = f"{self.url}/v1/completions", self.shape["request_timeout_s"]
                status, out = http(url, body, timeout=timeout_s)
                tokens = out.get("usage", {}).get("completion_tokens", 0) if status == 200 else 0
            except Exception as exc:
                status, tokens = -1, 0
                out = {"error": f"{type(exc).__name__}: {exc}"[:200]}
            self.results.append(
                {"t": began, "s": time.time() - began, "status": status, "tokens": tokens}
            )
            if status != 200:
                self.stop.wait(1.0)  # a 503 says retry later; do not spin

    def summary(self) -> dict[str, Any]:
        by: dict[str, int] = {}
        for r in self.results:
            by[str(r["status"])] = by.get(str(r["status"]), 0) + 1
        ok = [r for r in self.results if r["status"] == 200]
        return {
            "requests": len(self.results),
            "by_status": by,
            "tokens": sum(r["tokens"] for r in ok),
        }


class Cotenant:
    """The co-tenant subprocess (bench/gpu/cotenant.py), driven one command at a time."""

    def __init__(self, device: str, step_bytes: int) -> None:
        self.held = 0
        self.events: list[dict[str, Any]] = []
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(HERE / "cotenant.py"),
                "--device",
                device,
                "--step-bytes",
                str(step_bytes),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.events.append(self._read())

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the co-tenant ended (exit {self.proc.poll()})")
        return dict(json.loads(line))

    def command(self, cmd: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        event = self._read()
        self.events.append(event)
        self.held = int(event.get("held", self.held))
        return event

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                self.command("quit")
            self.proc.wait(timeout=10)
        except Exception:  # stuck or gone: end it (our own child, by its handle)
            self.proc.kill()
