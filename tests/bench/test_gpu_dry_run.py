"""`bench/gpu/run.sh --dry-run`: the GPU run's every part, on a toy model on this CPU, before
GPU time is spent on it. It checks the arguments, the imports, the output format and
that the run says CUDA is absent; it measures nothing. It has no budget (the GPU run's, in
seconds, is tested on a fake clock in test_gpu_budget.py): its fixed grid runs to the end
however slow the machine is, and every part ends done."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
ROW_KEYS = {
    "memory": {"path", "mask", "batch", "predicted", "measured", "error"},
    "blocks": {"kind", "predicted_bytes", "released_bytes", "restore_s", "bit_identical"},
    "decode": {"system", "mask", "batch", "context", "ms_per_step", "bytes_read_per_step"},
}

pytestmark = pytest.mark.slow


@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is the CPU's side")
def test_dry_run_runs_every_part_and_says_cuda_is_absent(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path), "RAP_CACHE_DIR": str(tmp_path / "cache")}
    args = ["--dry-run", "--parts", "memory,blocks,decode,scan"]
    run = subprocess.run(
        ["bash", str(ROOT / "bench/gpu/run.sh"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=840,  # a backstop under the slow tier's per-test limit, not a budget
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "CUDA is absent" in run.stdout
    assert "working tree:" in run.stdout  # the carry sizes are printed
    report = json.loads((tmp_path / "gpu.json").read_text())
    assert report["format"] == "rap-gpu-run/1"
    assert report["budget_s"] is None  # a dry run's parts never stop at a deadline
    assert {"torch", "transformers", "commit", "device"} <= report["env"].keys()
    parts = report["parts"]
    for name, keys in ROW_KEYS.items():
        assert parts[name]["status"] == "done", parts[name].get("error")
        assert parts[name]["rows"], name
        assert all(keys <= row.keys() for row in parts[name]["rows"]), name
        assert all(row.get("measured") is None for row in parts[name]["rows"])  # no CUDA
    assert all(row["bit_identical"] for row in parts["blocks"]["rows"])
    assert parts["scan"]["status"].startswith("dry run")
    assert parts["scan"]["cpu"]["seconds"] > 0
    summary = subprocess.run(
        [sys.executable, str(ROOT / "bench/gpu/summarize.py"), str(tmp_path / "gpu.json")],
        capture_output=True,
        text=True,
    )
    assert summary.returncode == 0, summary.stderr[-2000:]
    assert "| engine | dense |" in summary.stdout


def test_run_sh_refuses_unknown_arguments(tmp_path: Path) -> None:
    run = subprocess.run(
        ["bash", str(ROOT / "bench/gpu/run.sh"), "--frobnicate"],
        capture_output=True,
        text=True,
        env={**os.environ, "OUT": str(tmp_path)},
    )
    assert run.returncode == 2
    assert "expected --install" in run.stderr
