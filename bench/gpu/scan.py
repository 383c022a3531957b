"""Part 5 of the GPU run: the one-shot block scan of the default model, on the GPU, beside the
committed CPU scan (`rap/data/SmolLM2-135M-Instruct.oneshot.json`, float32, 2 CPU threads).

    python bench/gpu/scan.py --out DIR [--dry-run]

Runs `rap importance --method oneshot --device cuda --dtype float32 --refresh` in a subprocess
(the model's one-off GGUF conversion is timed apart, by a load before it), then adds the part
`scan` to DIR/gpu.json: the GPU and CPU seconds, and Spearman's ρ between the two files' scores
and removal ranks (the same scan on two devices should order the blocks alike). A dry run
checks that the model package and the calibration text are found and runs nothing.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from scipy.stats import spearmanr

from rap.core.scores import BlockScores

SHIPPED = Path(__file__).resolve().parents[2] / "rap/data/SmolLM2-135M-Instruct.oneshot.json"


def compare(cpu: BlockScores, gpu: BlockScores) -> dict[str, Any]:
    order_a, order_b = cpu.removal_order(), gpu.removal_order()
    rank_b = {blk: i for i, blk in enumerate(order_b)}
    return {
        "spearman_ranks": spearmanr(range(len(order_a)), [rank_b[b] for b in order_a]).statistic,
        "spearman_scores": spearmanr([*cpu.attn, *cpu.mlp], [*gpu.attn, *gpu.mlp]).statistic,
        "first_10_in_common": len(set(order_a[:10]) & set(order_b[:10])),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args()
    path = args.out / "gpu.json"
    report = json.loads(path.read_text()) if path.exists() else {"parts": {}}
    part: dict[str, Any] = {"status": "running"}
    report["parts"]["scan"] = part
    cpu = json.loads(SHIPPED.read_text())
    part["cpu"] = {k: cpu["details"][k] for k in ("device", "threads", "torch", "seconds")}
    if args.dry_run:
        from rap.core.loading import _gguf_path
        from rap.importance.calibration import data_dir

        part["status"] = "dry run: nothing measured"
        part["found"] = {"model": str(_gguf_path()), "calibration": str(data_dir())}
        print(f"scan: dry run, would read {part['found']}", flush=True)
    else:
        run = [sys.executable, "-m", "rap.cli"]
        start = time.perf_counter()
        load = [sys.executable, "-c", "import rap; rap.load_model(device='cuda')"]
        subprocess.run(load, check=True)  # the one-off GGUF conversion, outside the scan's time
        part["first_load_s"] = time.perf_counter() - start
        target = args.out / "oneshot-cuda.json"
        scan = ["importance", "--method", "oneshot", "--device", "cuda", "--dtype", "float32"]
        start = time.perf_counter()
        subprocess.run([*run, *scan, "--refresh", "--out", str(target)], check=True)
        part["wall_s"] = time.perf_counter() - start
        gpu = json.loads(target.read_text())
        part["gpu"] = {k: gpu["details"].get(k) for k in ("device", "torch", "seconds")}
        part["compare"] = compare(BlockScores.from_file(SHIPPED), BlockScores.from_file(target))
        part["speedup"] = cpu["details"]["seconds"] / gpu["details"]["seconds"]
        part["status"] = "done"
        print(f"scan: {json.dumps(part)}", flush=True)
    path.write_text(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
