"""`rap importance`: block scores (shipped, cached, or computed with a progress bar)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rap.cli.common import set_threads, tqdm_progress
from rap.core.constants import DTYPES
from rap.core.errors import RapError
from rap.core.loading import DEFAULT_MODEL, load_model


def cmd_importance(args: argparse.Namespace) -> int:
    from rap.importance.scorers import (  # lazy: heavy (torch, transformers)
        ScoreSettings,
        get_scores,
    )

    if args.tokens < args.seq_len:
        raise RapError(f"--tokens {args.tokens} is below --seq-len {args.seq_len}")
    set_threads(args.threads)
    settings = ScoreSettings(
        method=args.method,
        tokens=args.tokens,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        half=args.half,
        screen_batches=0 if args.exact else args.screen_batches,
        finalists=args.finalists,
    )
    model = load_model(args.model, dtype=args.dtype, device=args.device)
    progress = tqdm_progress(f"{args.method} {model.model_id}")
    scores, origin = get_scores(model, settings, progress, refresh=args.refresh)
    if args.out:
        Path(args.out).write_text(scores.to_json())
    if args.json:
        print(scores.to_json())
        return 0
    where = {"shipped": "shipped with the package", "cache": "from the cache"}.get(
        origin, f"computed in {scores.details.get('seconds', 0)} s"
    )
    print(f"{scores.method} scores of {scores.model} ({where}), higher = more important")
    if scores.calibration:
        c = scores.calibration
        print(f"calibration  {c.source}{'/' + c.half if c.half else ''}: {c.tokens:,} tokens")
    if scores.dense_ppl:
        print(f"dense ppl    {scores.dense_ppl:.3f}")
    order = scores.removal_order()
    print("drop first   " + ", ".join(f"{k}{i}" for k, i in order[:10]))
    print("keep last    " + ", ".join(f"{k}{i}" for k, i in order[-10:]))
    return 0


def add_commands(sub: Any) -> None:
    """Register `importance` on the main parser's subparsers."""
    imp = sub.add_parser("importance", help="block importance scores (gsi, oneshot, bi, ...)")
    imp.add_argument("--model", default=DEFAULT_MODEL, help="name, folder or hub id")
    imp.add_argument("--method", required=True, choices=("gsi", "oneshot", "bi", "magnitude"))
    imp.add_argument("--tokens", type=int, default=8192, help="calibration tokens (C4)")
    imp.add_argument("--seq-len", type=int, default=512, help="tokens per calibration chunk")
    imp.add_argument("--batch-size", type=int, default=4, help="chunks per forward pass")
    imp.add_argument("--half", choices=("a", "b"), help="first or second half of the documents")
    imp.add_argument("--screen-batches", type=int, default=1, help="gsi: batches that screen")
    imp.add_argument("--finalists", type=int, default=4, help="gsi: candidates run in full")
    imp.add_argument("--exact", action="store_true", help="gsi: every candidate on every token")
    imp.add_argument("--refresh", action="store_true", help="recompute even when cached")
    imp.add_argument("--out", help="also write the JSON here")
    imp.add_argument("--dtype", choices=DTYPES, help="default: float32 on CPU, float16 on GPU")
    imp.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if present")
    imp.add_argument("--threads", type=int, help="torch CPU threads")
    imp.add_argument("--json", action="store_true")
    imp.set_defaults(func=cmd_importance)
