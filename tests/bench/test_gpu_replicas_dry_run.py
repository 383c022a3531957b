"""The GPU run's replicas part (bench/gpu/replicas.py): its figures on made-up
samples (fast), and its dry run on this CPU (slow): one real local Ray cluster serving two
`random:toy` replicas while a co-tenant of host memory takes and gives back a simulated device's
memory. The dry run measures nothing; it checks that the part runs, says CUDA is absent, shuts
down, and writes the report the GPU run will write. It has no deadline: each phase ends on what
it is for (a request answered, a step's budgets seen moved), however slow the machine is."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench/gpu"))

import replicas_analysis as analysis  # noqa: E402  (a script folder, not a package)

G = 2**30


def sample(t: float, budgets: tuple[int, int], held: tuple[int, int], free: int | None = None):
    reps = {
        f"r{i}": {
            "budget": b,
            "held": h,
            "peak": h,
            "allocated": h,
            "reserved": h + 1,
            "predicted": b,
        }
        for i, (b, h) in enumerate(zip(budgets, held, strict=True))
    }
    nvml = {"used": 0, "free": free, "per_pid": None} if free is not None else None
    return {"t": t, "cotenant_bytes": 0, "nvml": nvml, "replicas": reps}


def test_reactions_time_the_budgets_the_fit_and_the_reserve() -> None:
    samples = [
        sample(0.0, (10 * G, 10 * G), (9 * G, 9 * G), free=3 * G),
        sample(1.0, (10 * G, 10 * G), (9 * G, 9 * G), free=1 * G),  # step at 0.9
        sample(1.5, (8 * G, 10 * G), (9 * G, 9 * G), free=1 * G),  # one budget moved
        sample(2.0, (8 * G, 8 * G), (9 * G, 8 * G), free=1 * G),  # both; r0 still over
        sample(2.5, (8 * G, 8 * G), (8 * G, 8 * G), free=3 * G),  # fits, reserve back
    ]
    events = [{"t": 0.9, "event": "alloc", "ok": True, "held": 2 * G}]
    (row,) = analysis.reactions(samples, events, margin_bytes=2 * G)
    assert row["budget_s"] == pytest.approx(1.1)
    assert row["fit_s"] == pytest.approx(1.6)
    assert row["nvml_free_s"] == pytest.approx(1.6)
    assert row["nvml_free_before"] == 3 * G
    over = analysis.over_share(samples)
    assert over["r0"]["samples_over"] == 2  # t = 1.5 and 2.0
    assert over["r0"]["max_over_bytes"] == G
    assert over["r0"]["bytes_s_over"] == pytest.approx(1.0 * G)  # 1 GiB for 1 s
    assert over["r1"]["samples_over"] == 0


def test_a_refused_step_and_a_cpu_run_give_no_figures_they_cannot_have() -> None:
    samples = [sample(0.0, (2, 2), (1, 1)), sample(1.0, (2, 2), (1, 1))]
    events = [{"t": 0.5, "event": "alloc", "ok": False, "held": 0}]
    assert analysis.reactions(samples, events, margin_bytes=None) == []
    acc = analysis.accounting(samples)
    assert acc["nvml_unaccounted_bytes"] is None
    assert acc["allocated_vs_predicted"]["median"] == pytest.approx(-0.5)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is the CPU's side")
def test_replicas_dry_run_serves_two_random_replicas_beside_a_cotenant(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path), "RAP_CACHE_DIR": str(tmp_path / "cache")}
    args = ["--dry-run", "--parts", "replicas"]
    run = subprocess.run(
        ["bash", str(ROOT / "bench/gpu/run.sh"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=840,  # a backstop under the slow tier's per-test limit, not a budget
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "CUDA is absent" in run.stdout and "nothing is measured" in run.stdout
    report = json.loads((tmp_path / "gpu-replicas.json").read_text())
    assert report["format"] == "rap-gpu-run/1"
    part = report["parts"]["replicas"]
    assert part["status"] == "done", part.get("error") or part.get("replica_logs")
    assert part["dry_run"] and part["device"]["simulated"]
    assert part["deadline_s"] is None and "waits" not in part  # every step's budgets moved
    assert part["chat"]["status"] == 200  # the byte tokenizer's chat path
    assert part["requests"]["by_status"].get("200", 0) > 0
    events = [e["event"] for e in part["cotenant_events"]]
    assert events == ["ready", "alloc", "alloc", "alloc", "alloc", "free", "bye"]
    assert all(e["ok"] for e in part["cotenant_events"] if e["event"] == "alloc")
    assert {"replica-0", "replica-1"} <= part["samples"][-1]["replicas"].keys()
    rows = part["summary"]["reactions"]
    assert [r["event"] for r in rows] == ["alloc"] * 4 + ["free"]
    # How fast replicas react is the GPU run's figure, not this test's: here every step gets a
    # row and its budgets are seen moved (each phase lasts until they are).
    assert all({"budget_s", "fit_s", "nvml_free_s"} <= r.keys() for r in rows)
    assert all(r["budget_s"] is not None for r in rows), rows
    assert set(part["summary"]["over_share"]) == {"replica-0", "replica-1"}
    summary = subprocess.run(
        [sys.executable, str(ROOT / "bench/gpu/summarize.py"), str(tmp_path / "gpu-replicas.json")],
        capture_output=True,
        text=True,
    )
    assert summary.returncode == 0, summary.stderr[-2000:]
    assert "| alloc |" in summary.stdout and "(simulated: a dry run)" in summary.stdout
