"""`rap heldout`: planners' masks on the held-out protocol's windows, resumable.

Masks are planned exactly as `rap plan --method M --budget-frac F --batch B --seq S` plans them
(one `make_planner` per method, the budget F × dense weights + KV at B × S, activations of the
engine step inside it). Every window's NLL is cached on disk as soon as its batch is measured
(`rap.importance.window_nll`), so a killed run, started again with the same command, measures
only what it had not written. Output: results.json and results.md in `--out`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rap.cli.common import add_prefill_tokens, parse_list, set_threads
from rap.core import byte_table, memory
from rap.core.constants import DTYPES
from rap.core.errors import BudgetError, RapError
from rap.core.loading import DEFAULT_MODEL, load_model
from rap.importance.heldout import DOMAINS, SPLITS, Windows, bos_id, model_stream, windows
from rap.importance.window_nll import lnppl
from rap.planning.registry import METHODS, make_planner

if TYPE_CHECKING:
    from rap.core.model import PrunableModel

DEFAULT_METHODS = "mem-greedy,gsi,oneshot,shortgpt,surrogate-greedy,surrogate-milp,rap"


def parse_shape(text: str) -> tuple[int, int]:
    """`8x2048` → (batch 8, sequence 2,048)."""
    try:
        batch, seq = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise RapError(f"--shape {text!r} is not BxS", expected="e.g. 8x2048 or 1x512") from None
    if batch < 1 or seq < 2:
        raise RapError(f"--shape {text} is empty", expected="batch ≥ 1 and seq ≥ 2")
    return batch, seq


def _check(args: argparse.Namespace) -> None:
    """Every list and flag checked before a model loads."""
    args.budget_list = parse_list(args.budgets, "--budgets", float)
    args.method_list = parse_list(args.methods, "--methods", str)
    args.domain_list = parse_list(args.domains, "--domains", str)
    args.batch, args.seq = parse_shape(args.shape)
    args.window_len = args.window or args.seq
    for frac in args.budget_list:
        if not 0.0 < frac <= 1.0:
            raise RapError(f"budget {frac} is outside (0, 1]", expected="fractions like 0.8")
    for method in args.method_list:
        if method not in METHODS:
            raise RapError(
                f"unknown method {method!r}",
                expected=f"some of {', '.join(METHODS)} (the oracle measures text: not here)",
            )
    for domain in args.domain_list:
        if domain not in DOMAINS:
            raise RapError(f"unknown domain {domain!r}", expected=f"some of {', '.join(DOMAINS)}")
    if args.split == "test" and not args.final:
        raise RapError(
            "--split test is the final judgement's text",
            expected="--split validation for every choice",
            fix="add --final only for the one reported run",
        )
    if args.max_windows is not None and args.max_windows < 1:
        raise RapError(f"--max-windows {args.max_windows} is too small", expected="at least 1")


def plan_rows(args: argparse.Namespace, model: PrunableModel) -> list[dict[str, Any]]:
    """One row per (budget, method): its mask key and bytes, or the error a budget it cannot
    meet gives."""
    cfg, prefill = model.config, min(args.prefill_tokens, args.seq)
    made = {
        m: make_planner(m, cfg, model.model_id, args.dtype, args.min_kept_fraction)
        for m in args.method_list
    }
    rows = []
    for frac in args.budget_list:
        budget = memory.budget_bytes(cfg, frac, args.batch, args.seq, args.dtype)
        for method in args.method_list:
            row: dict[str, Any] = {"budget": frac, "method": method, "budget_bytes": budget}
            try:
                mask = made[method].plan(budget, args.batch, args.seq, prefill)
            except BudgetError as exc:
                rows.append({**row, "error": str(exc).split(";")[0]})
                continue
            used = byte_table.predicted_bytes(
                cfg,
                mask,
                args.batch,
                args.seq,
                args.dtype,
                include_activations=True,
                prefill_tokens=prefill,
            )
            kept = sum(mask.attn) + sum(mask.mlp)
            row.update(key=mask.key, blocks=2 * mask.num_layers, blocks_kept=kept)
            rows.append({**row, "predicted_bytes": used})
    return rows


def domain_windows(args: argparse.Namespace, model: PrunableModel) -> dict[str, Windows]:
    return {
        d: windows(model, d, args.split, args.window_len, model_stream(model, d), args.max_windows)
        for d in args.domain_list
    }


def measure(
    args: argparse.Namespace, model: PrunableModel, keys: list[str], wins: dict[str, Windows]
) -> dict[str, dict[str, list[float]]]:
    """NLL per window of every key on every domain, with one progress bar over all windows."""
    from tqdm import tqdm  # lazy: heavy (tqdm)

    from rap.importance.window_nll import WindowMeter  # lazy: heavy (torch)

    meter = WindowMeter(model, Path(args.cache) if args.cache else None, args.batch_size)
    total = len(keys) * sum(len(w.starts) for w in wins.values())
    out: dict[str, dict[str, list[float]]] = {}
    with tqdm(total=total, desc=f"heldout {args.split}", unit="window", file=sys.stderr) as bar:
        for key in keys:
            bar.set_postfix_str(key or "dense")
            out[key] = {d: meter.nll(key, w, bar.update) for d, w in wins.items()}
    args.computed_windows = meter.computed
    return out


def _command(args: argparse.Namespace) -> str:
    parts = [
        f"rap heldout --model {args.model} --methods {args.methods} --budgets {args.budgets}",
        f"--shape {args.shape} --window {args.window_len} --split {args.split}",
        f"--domains {args.domains} --dtype {args.dtype} --prefill-tokens {args.prefill_tokens}",
        f"--min-kept-fraction {args.min_kept_fraction}",
    ]
    if args.compute_dtype:
        parts.append(f"--compute-dtype {args.compute_dtype}")
    if args.final:
        parts.append("--final")
    if args.max_windows is not None:
        parts.append(f"--max-windows {args.max_windows}")
    return " ".join(parts) + f" --out {args.out}"


def cmd_heldout(args: argparse.Namespace) -> int:
    from rap.importance import heldout_report  # lazy: heavy (numpy)

    _check(args)
    set_threads(args.threads)
    model = load_model(args.model, dtype=args.compute_dtype)
    rows = plan_rows(args, model)
    wins = domain_windows(args, model)
    keys = list(dict.fromkeys(["", *(r["key"] for r in rows if "key" in r)]))
    nll = measure(args, model, keys, wins)
    heldout_report.summarise(rows, nll, args.window_len, args.draws)
    result = _result(args, model, rows, nll, wins)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1))
    text = heldout_report.markdown(result)
    (out / "results.md").write_text(text)
    print(text)
    print(f"measured {args.computed_windows} windows (the rest from the cache); wrote {out}")
    return 0


def _result(
    args: argparse.Namespace,
    model: PrunableModel,
    rows: list[dict[str, Any]],
    nll: dict[str, dict[str, list[float]]],
    wins: dict[str, Windows],
) -> dict[str, Any]:

    domains = {}
    for d, w in wins.items():
        short = w.shortfall()
        if args.max_windows is not None:
            short = f"--max-windows {args.max_windows}" + (f"; {short}" if short else "")
        info = {"role": DOMAINS[d], "windows": len(w.starts), "documents": w.documents}
        domains[d] = {**info, "stream_tokens": w.stream_tokens, "shortfall": short}
    return {
        "model": model.model_id,
        "command": _command(args),
        "split": args.split,
        "shape": {"batch": args.batch, "seq": args.seq},
        "window": args.window_len,
        "bos_id": bos_id(model),
        "dtype": args.dtype,
        "compute_dtype": str(model.dtype).removeprefix("torch."),
        "device": str(model.device),
        "budgets": args.budget_list,
        "methods": args.method_list,
        "domains": domains,
        "dense_lnppl": {d: round(lnppl(v, args.window_len), 4) for d, v in nll[""].items()},
        "window_starts": {d: list(w.starts) for d, w in wins.items()},
        "rows": rows,
        "nll": nll,
    }


def add_commands(sub: Any) -> None:
    """Register `heldout` on the main parser's subparsers."""
    p = sub.add_parser(
        "heldout",
        help="planners' masks on held-out text domains, with paired intervals (resumable)",
        description=(
            "Plan each method's mask as `rap plan` does, then measure NLL on the protocol's "
            "windows of every domain (rap.importance.heldout: text no score, fit or earlier "
            "choice read; each window is BOS + window − 1 tokens). Every window's NLL is cached "
            "as soon as it is measured: run the same command again to resume."
        ),
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help="name, folder or hub id")
    p.add_argument("--methods", default=DEFAULT_METHODS, help=f"some of {', '.join(METHODS)}")
    p.add_argument("--budgets", default="0.8,0.6", help="fractions of dense weights + KV")
    p.add_argument("--shape", default="8x2048", help="BxS the masks are planned for")
    p.add_argument("--window", type=int, help="tokens per window, BOS included (default: S)")
    p.add_argument("--split", default="validation", choices=SPLITS)
    p.add_argument("--final", action="store_true", help="allow --split test (the one final run)")
    p.add_argument("--domains", default=",".join(DOMAINS), help="some of the protocol's domains")
    p.add_argument("--dtype", default="float16", choices=DTYPES, help="the budget's dtype")
    p.add_argument(
        "--compute-dtype",
        choices=DTYPES,
        help="dtype of the forward passes (default: float32 on a CPU, float16 on a GPU); "
        "float32 on a GPU gives about the CPU's numbers; each dtype has its own cache lines",
    )
    add_prefill_tokens(p)
    p.add_argument("--min-kept-fraction", type=float, default=0.0, help="as rap plan's")
    p.add_argument("--max-windows", type=int, help="first N windows per domain (a quick run)")
    p.add_argument(
        "--batch-size",
        type=int,
        default=4,
        help="windows per forward pass (their float32 logits: 4 × 2,048 tokens of the default "
        "model's 49,152-token vocabulary are 1.6 GB, twice that at the loss)",
    )
    p.add_argument("--draws", type=int, default=2000, help="bootstrap draws per interval")
    p.add_argument("--cache", help="NLL cache file (default: the cache folder's quality/)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--out", required=True, help="folder for results.json and results.md")
    p.set_defaults(func=cmd_heldout)
