"""A real Prometheus (Debian's package) scrapes Ray's metrics while RAP Serve answers a bounded
burst with a budget drop and an oversized prompt; then every query of the Grafana dashboard,
exactly as the dashboard holds it, must return data from Prometheus' HTTP API. Slow tier."""

from __future__ import annotations

import ctypes
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest

from rap.ops.ray_env import patient_serve_env

pytestmark = pytest.mark.slow

ADMIN = "prometheus-test-admin"
MODEL = "SmolLM2-135M-Instruct"
BUDGETS_GIB = {"replica-0": 0.6, "replica-1": 0.45}
DROPPED_GIB = 0.3  # replica-0's budget after the operator's drop
WINDOW = "5m"  # stands for Grafana's $__rate_interval: covers the whole burst


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _prometheus_binary() -> str:
    """Debian's prometheus, installed with apt-get when missing."""
    found = shutil.which("prometheus")
    if found:
        return found
    apt = shutil.which("apt-get")
    if apt is None:
        pytest.skip("prometheus is not installed and apt-get is unavailable to install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run([apt, "update", "-qq"], check=True, env=env, capture_output=True)
    subprocess.run(
        [apt, "install", "-y", "-qq", "--no-install-recommends", "prometheus"],
        check=True,
        env=env,
        capture_output=True,
    )
    found = shutil.which("prometheus")
    assert found, "apt-get installed prometheus but it is not on PATH"
    return found


def _get_json(url: str, timeout_s: float = 10.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout_s) as resp:
        return json.loads(resp.read())


def _die_with_parent() -> None:
    """In the child: SIGTERM it when pytest dies, even killed, so no Prometheus is orphaned."""
    if sys.platform == "linux":
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def _start_prometheus(binary: str, target_port: int, workdir: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    config = workdir / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: ray\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{target_port}']\n"
    )
    log = (workdir / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        preexec_fn=_die_with_parent,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(f"{url}/-/ready", timeout=2).read()
            return proc, url
        except (urllib.error.URLError, ConnectionError):
            assert proc.poll() is None, (workdir / "prometheus.log").read_text()[-2000:]
            time.sleep(0.2)
    proc.terminate()
    raise AssertionError("prometheus did not become ready")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory):
    """Ray with a known metrics port, Prometheus scraping it, and the RAP Serve app."""
    import ray
    from ray import serve

    from deployments.app import build_app
    from rap.core.loading import resolve

    binary = _prometheus_binary()
    resolve("smollm2")
    os.environ["RAP_ADMIN_TOKEN"] = ADMIN  # before ray.init: workers inherit it
    metrics_port, http_port = _free_port(), _free_port()
    patient_serve_env()
    # address="local": a cluster of our own even if another Ray runs on this machine.
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        _metrics_export_port=metrics_port,
    )
    prom = None
    try:
        prom, prom_url = _start_prometheus(binary, metrics_port, tmp_path_factory.mktemp("prom"))
        serve.start(http_options={"host": "127.0.0.1", "port": http_port})
        config = {
            "model": "smollm2",
            "replicas": [
                {"name": name, "budget_gib": gib, "num_cpus": 0.5}
                for name, gib in BUDGETS_GIB.items()
            ],
            "engine": {"max_batch_size": 4, "target_seq": 256},
            "telemetry_period_s": 0.3,
        }
        serve.run(build_app(config), name="rap", route_prefix="/")
        yield SimpleNamespace(url=f"http://127.0.0.1:{http_port}", prometheus=prom_url)
    finally:
        serve.shutdown()
        ray.shutdown()
        if prom is not None:
            prom.terminate()
            prom.wait(timeout=30)
        os.environ.pop("RAP_ADMIN_TOKEN", None)


def call(url: str, path: str, body: dict, token: str | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(), method="POST")
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def complete(url: str, prompt: str, max_tokens: int = 6) -> tuple[int, dict]:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    return call(url, "/v1/completions", body)


def refused_prompt_tokens(url: str, max_tokens: int) -> int | None:
    """Fewest prompt tokens (whole 256s, with a page of margin) whose KV pages no replica's pool
    holds — from the replicas' own telemetry (pages per kept attention layer × 16 tokens): a
    certain memory 503. None when every prompt within the context would fit somewhere."""
    req = urllib.request.Request(url + "/admin/state")
    req.add_header("Authorization", f"Bearer {ADMIN}")
    with urllib.request.urlopen(req, timeout=120) as resp:
        replicas = json.loads(resp.read())["replicas"].values()
    pages = max(
        (t["kv_pages_in_use"] + t["kv_pages_free"]) // max(t["attn_kept"], 1) for t in replicas
    )
    prompt = ((pages * 16 + 16 - max_tokens) // 256 + 1) * 256
    return prompt if prompt + max_tokens < 8192 - 16 else None


def burst(url: str) -> None:
    """Short requests on both replicas, a budget drop, requests under the new plan, a prompt
    too big for any budget (memory 503) and one longer than the context (400)."""
    with ThreadPoolExecutor(4) as pool:
        first = list(pool.map(lambda i: complete(url, f"Count to {i}:"), range(8)))
    assert [s for s, _ in first] == [200] * 8, first
    status, out = call(url, "/admin/budget", {"replica": "replica-0", "gib": DROPPED_GIB}, ADMIN)
    assert status == 200, out
    for i in range(4):
        assert complete(url, f"After the drop {i}:")[0] == 200
    tokens = refused_prompt_tokens(url, max_tokens=8)  # the router retries on the other one
    if tokens is not None:
        status, out = complete(url, "hello " * tokens, max_tokens=8)
        assert status == 503 and "memory" in out["error"]["message"], (status, out)
    status, out = complete(url, "hello " * 9000, max_tokens=8)
    assert status == 400, (status, out)


def returns_data(prometheus: str, expr: str) -> bool:
    query = urllib.parse.urlencode({"query": expr})
    out = _get_json(f"{prometheus}/api/v1/query?{query}")
    assert out["status"] == "success", out
    values = [float(r["value"][1]) for r in out["data"]["result"]]
    return any(not math.isnan(v) for v in values)


def label_has_values(prometheus: str, definition: str) -> bool:
    """A `label_values(metric, label)` variable: the label's values on that metric."""
    metric, label = (s.strip() for s in definition.removeprefix("label_values(")[:-1].split(","))
    query = urllib.parse.urlencode({"match[]": metric})
    return bool(_get_json(f"{prometheus}/api/v1/label/{label}/values?{query}")["data"])


def test_every_dashboard_query_returns_data(stack) -> None:
    from rap.ops.grafana import dashboard, queries, render

    burst(stack.url)
    dash = dashboard()
    exprs = queries(dash)
    variables = [v["definition"] for v in dash["templating"]["list"] if "definition" in v]
    assert exprs and variables
    missing: list[str] = exprs
    deadline = time.monotonic() + 90  # Ray exports every few seconds; Prometheus scrapes 1/s
    while missing and time.monotonic() < deadline:
        complete(stack.url, "Keep the rates alive:")  # new samples in every window
        missing = [e for e in exprs if not returns_data(stack.prometheus, render(e, WINDOW))]
        if missing:
            time.sleep(3)
    assert not missing, "queries without data:\n" + "\n".join(render(e, WINDOW) for e in missing)
    empty = [v for v in variables if not label_has_values(stack.prometheus, v)]
    assert not empty, f"variables without values: {empty}"
