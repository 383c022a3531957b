"""`rap importance`: block scores (shipped, cached, or computed with a progress bar)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from rap.cli.common import set_threads, tqdm_progress
from rap.cli.importance_notice import compute_notice
from rap.core.constants import DTYPES
from rap.core.errors import RapError
from rap.core.loading import DEFAULT_MODEL, load_model

GSI_BATCH_SIZE, GSI_FINALISTS = 1, 3
"""`--batch-size` and `--finalists` for `--method gsi` when not given: the race the shipped
GSI scores ran (docs/importance.md, "Commands"), so that `rap importance --method gsi` alone
answers from the package (tests/cli/test_cli.py checks them against the shipped file)."""
BATCH_SIZE, FINALISTS = 4, 4
"""The same for the other methods (`--finalists` is GSI's only)."""


def settings_from_args(args: argparse.Namespace) -> Any:
    """The `ScoreSettings` the flags ask for, with the method's defaults where none is given."""
    from rap.importance.scorers import ScoreSettings  # lazy: heavy (torch)

    gsi = args.method == "gsi"
    default_batch, default_finalists = (
        (GSI_BATCH_SIZE, GSI_FINALISTS) if gsi else (BATCH_SIZE, FINALISTS)
    )
    batch_size = default_batch if args.batch_size is None else args.batch_size
    finalists = default_finalists if args.finalists is None else args.finalists
    return ScoreSettings(
        method=args.method,
        tokens=args.tokens,
        seq_len=args.seq_len,
        batch_size=batch_size,
        half=args.half,
        screen_batches=0 if args.exact else args.screen_batches,
        finalists=finalists,
    )


def _will_compute(model: Any, settings: Any, refresh: bool) -> bool:
    """Whether `get_scores` will compute, by the same tests it makes: neither the shipped
    scores nor the cache answer (the calibration text is cached in memory, so asking twice
    costs nothing)."""
    from rap.core.scores import cache_path  # lazy: heavy (torch)
    from rap.importance.calibration import calibration_chunks  # lazy: heavy (torch)
    from rap.importance.scorers import model_digest, shipped_match  # lazy: heavy (torch)

    if refresh:
        return True
    digest, text = model_digest(model), None
    if settings.method != "magnitude":
        _, text = calibration_chunks(
            model.tokenizer, settings.seq_len, settings.tokens, model.dims.vocab, settings.half
        )
    if shipped_match(model, settings, text, digest) is not None:
        return False
    return not cache_path(digest, settings.method, settings.key(text)).is_file()


def cmd_importance(args: argparse.Namespace) -> int:
    from rap.importance.scorers import get_scores  # lazy: heavy (torch, transformers)

    if args.tokens < args.seq_len:
        raise RapError(f"--tokens {args.tokens} is below --seq-len {args.seq_len}")
    set_threads(args.threads)
    settings = settings_from_args(args)
    model = load_model(args.model, dtype=args.dtype, device=args.device)
    # Said before computing: a GSI run takes most of an hour on a CPU and shows no progress
    # until its first step ends. On stderr, so that --json's output stays JSON.
    if settings.method != "magnitude" and _will_compute(model, settings, args.refresh):
        print(compute_notice(model.model_id, model.num_layers, settings), file=sys.stderr)
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
    imp.add_argument(
        "--batch-size",
        type=int,
        help=f"chunks per forward pass (default: {GSI_BATCH_SIZE} for gsi, the shipped "
        f"scores' race, else {BATCH_SIZE})",
    )
    imp.add_argument("--half", choices=("a", "b"), help="first or second half of the documents")
    imp.add_argument("--screen-batches", type=int, default=1, help="gsi: batches that screen")
    imp.add_argument(
        "--finalists",
        type=int,
        help=f"gsi: candidates run in full (default: {GSI_FINALISTS}, the shipped scores' race)",
    )
    imp.add_argument("--exact", action="store_true", help="gsi: every candidate on every token")
    imp.add_argument("--refresh", action="store_true", help="recompute even when cached")
    imp.add_argument("--out", help="also write the JSON here")
    imp.add_argument("--dtype", choices=DTYPES, help="default: float32 on CPU, float16 on GPU")
    imp.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if present")
    imp.add_argument("--threads", type=int, help="torch CPU threads")
    imp.add_argument("--json", action="store_true")
    imp.set_defaults(func=cmd_importance)
