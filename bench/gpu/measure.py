"""The GPU run's measuring program (issue 19): parts in priority order, JSON after each point.

    python bench/gpu/measure.py --out DIR [--parts memory,blocks,decode] [--dry-run]

Writes DIR/gpu.json (`Report`): the environment (device, driver, torch, CUDA, transformers,
commit), then per part its rows and a status: done, partial (time), or error with the
traceback; a part that fails does not stop the next. On a GPU each part has a share of
`--budget-s` and stops taking new points when its time is up (`budget.Budget`). Parts: `memory`
and `blocks` (`memory_parts.py`), `decode` (`decode.py`). The model is Llama-2-7B-shaped with
random weights in bfloat16; `--dry-run` (or no CUDA) runs every part on a toy model on the CPU,
says that nothing is measured, and has no budget: its fixed grid runs to the end however slow
the machine is.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

import torch
from budget import Budget, Clock
from common import Report, cuda, environment, random_llama
from decode import part_decode
from memory_parts import part_blocks, part_memory

PARTS = {"memory": (part_memory, 0.3), "blocks": (part_blocks, 0.1), "decode": (part_decode, 0.6)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for gpu.json")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {list(PARTS)}")
    ap.add_argument(
        "--budget-s", type=float, default=200.0, help="seconds for all parts (a GPU run only)"
    )
    ap.add_argument("--dry-run", action="store_true", help="toy model on the CPU")
    args = ap.parse_args()
    parts = [p for p in args.parts.split(",") if p]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        ap.error(f"unknown parts {unknown}: expected some of {list(PARTS)}")
    toy = args.dry_run or not cuda()
    if not cuda():
        print("CUDA is absent: dry run on a toy model on the CPU, nothing is measured", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    report = Report(args.out / "gpu.json", environment())
    print(f"environment: {report.data['env']}", flush=True)
    budget = run_budget(toy, args.budget_s, parts)
    report.data["budget_s"] = budget.seconds
    if budget.seconds is None:
        print("budget: none (a dry run does its fixed grid to the end)", flush=True)
    start = time.monotonic()
    model = random_llama(toy)
    report.data["model"] = {
        "id": model.model_id,
        "dtype": str(model.dtype),
        "weight_bytes": model.weight_bytes(),
        "build_s": time.monotonic() - start,
    }
    report.save()
    for name in parts:
        fn, share = PARTS[name]
        deadline = budget.deadline(share)
        began = time.monotonic()
        try:
            fn(model, report, deadline, toy)
        except Exception:
            out = report.part(name)
            out["status"] = "error"
            out["error"] = traceback.format_exc()
            print(f"{name}: error\n{out['error']}", flush=True)
        report.part(name)["seconds"] = time.monotonic() - began
        report.save()
        if cuda():
            torch.cuda.empty_cache()
    print(f"wrote {report.path}", flush=True)
    return 0


def run_budget(
    toy: bool, budget_s: float, parts: list[str], clock: Clock = time.monotonic
) -> Budget:
    """The GPU run's `budget_s`, shared by `parts` in PARTS' proportions; a toy (dry) run has
    none."""
    total = sum(PARTS[p][1] for p in parts)
    return Budget(None if toy else budget_s, total, clock)


if __name__ == "__main__":
    sys.exit(main())
