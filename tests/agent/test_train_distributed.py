"""`rap train` on a two-node Ray cluster (slow tier): a head and a second node started with
`ray start` on this machine, the second advertising a resource of its own; `--env-runners 2
--runner-resource rap_runner` places both env runners there, which Ray's state API confirms.
The RayJob manifest (k8s/rayjob-train.yaml) uses the same mechanism: its worker group
advertises `rap_runner` and the entrypoint passes `--runner-resource rap_runner`."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ray(*args: str, env: dict[str, str]) -> None:
    done = subprocess.run(
        [str(BIN / "ray"), *args], env=env, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, (args, done.stderr[-2000:])


@pytest.fixture(scope="module")
def cluster():
    """A head (2 CPUs: it could host the runners) and a node with 2 CPUs and `rap_runner: 2`,
    in a temp dir of their own; only this cluster's processes are killed at the end (not
    `ray stop`, which would stop every Ray on the machine)."""
    temp = tempfile.mkdtemp(prefix="rapd-", dir="/tmp")  # short: Ray's socket paths are bounded
    port, dash = _free_port(), _free_port()
    # Token auth as KubeRay sets it up (RAY_AUTH_MODE/RAY_AUTH_TOKEN in every Ray process), with
    # a token of this cluster's own rather than the one `ray start` writes to ~/.ray.
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **auth}
    env.pop("RAY_ADDRESS", None)
    address = f"127.0.0.1:{port}"
    try:
        _ray(
            "start",
            "--head",
            f"--port={port}",
            "--num-cpus=2",
            f"--temp-dir={temp}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            "--include-dashboard=true",
            env=env,
        )
        _ray(
            "start",
            f"--address={address}",
            "--num-cpus=2",
            '--resources={"rap_runner": 2}',
            env=env,
        )
        yield {
            "address": address,
            "dashboard": f"http://127.0.0.1:{dash}",
            "env": env,
            "auth": auth,
        }
    finally:
        for proc in psutil.process_iter(["cmdline"]):
            if any(temp in part for part in (proc.info["cmdline"] or [])):
                proc.kill()
        shutil.rmtree(temp, ignore_errors=True)


def test_env_runners_run_on_the_node_with_the_runner_resource(cluster, tmp_path: Path) -> None:
    out = tmp_path / "ppo"
    cmd = [
        str(BIN / "rap"),
        "train",
        "--config",
        str(ROOT / "rllib_configs" / "ppo.py"),
        "--smoke",
        "--env-runners",
        "2",
        "--runner-resource",
        "rap_runner",
        "--address",
        cluster["address"],
        "--out",
        str(out),
        "--json",
    ]
    done = subprocess.run(cmd, env=cluster["env"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ray"] == cluster["address"] and len(summary["env_runner_nodes"]) == 2

    # Ray's own record, through its state API (the `ray list` CLI: this process's Ray was
    # imported without token auth, and Ray reads that setting once per process).
    nodes = _state(cluster, "nodes")
    runner_node = {n["node_id"] for n in nodes if "rap_runner" in (n.get("resources_total") or {})}
    head = {n["node_id"] for n in nodes if n.get("is_head_node")}
    assert len(nodes) == 2 and len(runner_node) == 1 and runner_node.isdisjoint(head)
    actors = _state(cluster, "actors", "--filter", "class_name=SingleAgentEnvRunner")
    assert len(actors) == 2
    assert {a["node_id"] for a in actors} == runner_node
    assert set(summary["env_runner_nodes"]) == runner_node


def _state(cluster: dict, kind: str, *filters: str) -> list[dict]:
    cmd = [
        str(BIN / "ray"),
        "list",
        kind,
        "--address",
        cluster["dashboard"],
        *filters,
        "--detail",
        "--format",
        "json",
    ]
    done = subprocess.run(cmd, env=cluster["env"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return list(json.loads(done.stdout))
