"""The co-tenant of the replicas part (bench/gpu/replicas.py): a plain torch process on the
replicas' GPU that takes memory in steps and gives it back, as another job on the device would.

    python bench/gpu/cotenant.py --device cuda|cpu --step-bytes N [--patience-s S]

Commands on stdin, one per line: `alloc` (one more step of N bytes), `free` (everything),
`quit`. Each answer is one JSON line on stdout with wall-clock times (`time.time()`, the clock
the replicas' telemetry uses). An allocation that does not fit is retried every 0.1 s for up to
`--patience-s` (the replicas may still be giving memory back), then reported as refused. On a
CPU (the dry run) the bytes are host memory, written so that they are really resident.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import torch


def say(**event: Any) -> None:
    print(json.dumps({"t": time.time(), **event}), flush=True)


def take(nbytes: int, device: str, patience_s: float) -> tuple[torch.Tensor | None, int, str]:
    """(the buffer or None, tries, last error): retried while the device is full."""
    end, tries, error = time.monotonic() + patience_s, 0, ""
    while True:
        tries += 1
        try:
            buf = torch.ones(nbytes, dtype=torch.uint8, device=device)  # resident, not lazy
            if device == "cuda":
                torch.cuda.synchronize()
            return buf, tries, ""
        except torch.OutOfMemoryError as exc:
            error = str(exc).splitlines()[0][:200]
            if device == "cuda":
                torch.cuda.empty_cache()
        if time.monotonic() >= end:
            return None, tries, error
        time.sleep(0.1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), required=True)
    ap.add_argument("--step-bytes", type=int, required=True)
    ap.add_argument("--patience-s", type=float, default=6.0)
    args = ap.parse_args()
    held: list[torch.Tensor] = []
    if args.device == "cuda":
        torch.cuda.init()  # the context's bytes appear now, before the baseline is measured
        torch.empty(1, device="cuda")
    say(event="ready", device=args.device)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "alloc":
            asked = time.time()
            buf, tries, error = take(args.step_bytes, args.device, args.patience_s)
            if buf is not None:
                held.append(buf)
            nbytes = sum(b.numel() for b in held)
            say(
                event="alloc",
                asked=asked,
                ok=buf is not None,
                tries=tries,
                held=nbytes,
                error=error,
            )
        elif cmd == "free":
            held.clear()
            if args.device == "cuda":
                torch.cuda.empty_cache()  # back to the device, where NVML sees it
            say(event="free", held=0)
        elif cmd == "quit":
            break
    say(event="bye")
    return 0


if __name__ == "__main__":
    sys.exit(main())
