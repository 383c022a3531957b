"""`rap eval`: perplexity and zero-shot accuracy of planners' masks at memory budgets."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rap.cli.common import add_prefill_tokens, parse_list, set_threads, tqdm_progress
from rap.core import byte_table, memory
from rap.core.constants import DTYPES
from rap.core.errors import BudgetError, RapError
from rap.core.loading import DEFAULT_MODEL, cache_dir, load_model
from rap.importance import report
from rap.importance.calibration import (
    PERPLEXITY_SOURCE,
    SOURCES,
    perplexity_chunks,
)
from rap.importance.user_text import read_text, text_windows
from rap.importance.zeroshot import TASKS, task_size
from rap.planning.planners import SCORES_FOR
from rap.planning.registry import METHODS, make_planner


def _eval_plan(args: argparse.Namespace, model: Any) -> tuple[list[dict[str, Any]], list[Any]]:
    """Rows (budget, method) with their masks; a budget a method cannot meet becomes a row
    with its error, not a failure."""

    rows: list[dict[str, Any]] = []
    masks = []
    cfg, step = model.config, args.step_prefill
    act = memory.step_bytes(cfg, args.batch, step, args.dtype)
    made = {m: make_planner(m, cfg, model.model_id, args.dtype) for m in args.method_list}
    for frac in args.budget_list:
        # The paper's budget (a share of the dense weights + KV) plus the engine step's
        # activations, which every method prices alike: 1.0 is the dense model.
        budget = memory.budget_bytes(cfg, frac, args.batch, args.seq, args.dtype) + act
        for method in args.method_list:
            row: dict[str, Any] = {"budget": frac, "method": method, "budget_bytes": budget}
            try:
                mask = made[method].plan(budget, args.batch, args.seq, step)
            except BudgetError as exc:
                row["error"] = str(exc).split(";")[0]
                rows.append(row)
                continue
            row.update(
                attn=list(mask.attn),
                mlp=list(mask.mlp),
                blocks=2 * mask.num_layers,
                blocks_kept=sum(mask.attn) + sum(mask.mlp),
                predicted_bytes=byte_table.predicted_bytes(
                    cfg,
                    mask,
                    args.batch,
                    args.seq,
                    args.dtype,
                    include_activations=True,
                    prefill_tokens=step,
                ),
            )
            rows.append(row)
            masks.append(mask)
    return rows, masks


def _eval_command(args: argparse.Namespace) -> str:
    """The command line that reproduces a result (every option that changes it)."""
    parts = [
        f"rap eval --model {args.model} --budgets {args.budgets} --methods {args.methods}",
        f"--batch {args.batch} --seq {args.seq} --dtype {args.dtype}",
        f"--prefill-tokens {args.prefill_tokens}",
        f"--ppl-tokens {args.ppl_tokens} --ppl-seq-len {args.ppl_seq_len}",
    ]
    if args.limit is not None:
        parts.append(f"--limit {args.limit}")
    if args.tasks:
        parts.append(f"--tasks {args.tasks}")
    if args.text:
        parts.append(f"--text {args.text}")
    return " ".join(parts) + f" --out {args.out}"


def _check_eval_args(args: argparse.Namespace) -> list[str]:
    """Parse and check the lists before any model loads; returns the tasks."""

    args.budget_list = parse_list(args.budgets, "--budgets", float)
    args.method_list = parse_list(args.methods, "--methods", str)
    args.step_prefill = min(args.prefill_tokens, args.seq)  # prompt tokens priced per row
    tasks = parse_list(args.tasks, "--tasks", str) if args.tasks else list(TASKS)
    if tasks == ["none"]:  # perplexity alone
        tasks = []
    if args.text:
        read_text(args.text)  # a bad file fails now, not after the model has loaded
    for frac in args.budget_list:
        if not 0.0 < frac <= 1.0:
            raise RapError(f"budget {frac} is outside (0, 1]", expected="fractions like 0.8")
    for method in args.method_list:
        if method == "oracle":
            raise RapError(
                "rap eval does not run method 'oracle' (minutes of measuring per mask)",
                expected=f"some of {', '.join(METHODS)}",
                fix="run it with rap plan --method oracle, or bench/compare_policies.py --oracle",
            )
        if method not in METHODS:
            raise RapError(f"unknown method {method!r}", expected=f"some of {', '.join(METHODS)}")
    for task in tasks:
        if task not in TASKS:
            raise RapError(f"unknown task {task!r}", expected=f"some of {', '.join(TASKS)}")
    if args.limit is not None and args.limit < 1:
        raise RapError(f"--limit {args.limit} is too small", expected="at least 1")
    return tasks


def cmd_eval(args: argparse.Namespace) -> int:
    from rap.importance.evaluate import evaluate_masks  # lazy: heavy (torch, transformers)

    tasks = _check_eval_args(args)
    set_threads(args.threads)
    model = load_model(args.model)
    if args.text:
        text_ids = text_windows(model, args.text, args.ppl_seq_len, args.ppl_tokens)
    else:
        vocab = model.dims.vocab
        text_ids = perplexity_chunks(model.tokenizer, args.ppl_seq_len, args.ppl_tokens, vocab)
    text = text_ids[1]
    rows, masks = _eval_plan(args, model)
    cache = None
    if not args.no_cache:
        from rap.importance.scorers import model_digest  # lazy: heavy (torch, transformers)

        cache = cache_dir() / "eval" / f"{model_digest(model)[:16]}.json"
    quality = evaluate_masks(
        model,
        masks,
        tasks,
        args.limit,
        args.ppl_tokens,
        args.ppl_seq_len,
        tqdm_progress(f"eval {model.model_id}"),
        cache,
        text_ids,
    )
    for row, q in zip([r for r in rows if "error" not in r], quality, strict=True):
        row.update(ppl=q.ppl, tasks=q.tasks, seconds=round(q.seconds, 1))
    result = _eval_result(args, model, tasks, text, rows)
    paths = report.write(result, Path(args.out))
    print(report.markdown(result))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _eval_result(
    args: argparse.Namespace, model: Any, tasks: list[str], text: Any, rows: list[Any]
) -> dict[str, Any]:

    counts = {t: min(args.limit or task_size(t), task_size(t)) for t in tasks}
    dense = memory.dense_mask(model.config)
    return {
        "model": model.model_id,
        "command": _eval_command(args),
        "workload": {
            "batch": args.batch,
            "seq": args.seq,
            "dtype": args.dtype,
            "dense_bytes": memory.weight_bytes(model.config, dense, args.dtype)
            + memory.kv_bytes(model.config, dense, args.batch, args.seq, args.dtype),
            "step_bytes": memory.step_bytes(
                model.config, args.batch, args.step_prefill, args.dtype
            ),
        },
        "perplexity_text": {
            **text.model_dump(),
            "file": args.text or SOURCES[PERPLEXITY_SOURCE],
            "bos": bool(args.text),
        },
        "limit": args.limit,
        "tasks": counts,
        "ci95_max": max((1.96 * (0.25 / n) ** 0.5 for n in counts.values()), default=0.0),
        "methods": args.method_list,
        "budgets": args.budget_list,
        "score_sources": {m: _score_source(m) for m in args.method_list},
        "compute_dtype": str(model.dtype).removeprefix("torch."),
        "device": str(model.device),
        "rows": rows,
    }


def _score_source(method: str) -> str:
    """What a method's choices rest on: stored scores, the surrogate, the policy, a seed."""
    if method == "rap":
        return "policy"
    if method.startswith("surrogate-"):
        return "surrogate"
    return SCORES_FOR.get(method, "seed 0")


def add_commands(sub: Any) -> None:
    """Register `eval` on the main parser's subparsers."""
    ev = sub.add_parser("eval", help="perplexity and zero-shot accuracy at memory budgets")
    ev.add_argument("--model", default=DEFAULT_MODEL, help="name, folder or hub id")
    ev.add_argument("--budgets", default="1.0,0.8,0.6", help="fractions of dense weights + KV")
    ev.add_argument(
        "--methods",
        default="gsi,oneshot,mem-greedy,shortgpt,attn-drop,mlp-drop,random",
        help="stored-score planners (gsi, oneshot, mem-greedy, shortgpt, attn-drop, mlp-drop, "
        "random), search on the surrogate (surrogate-greedy, surrogate-beam, surrogate-milp) "
        "and rap (the shipped policy); not oracle; no quality floor",
    )
    add_prefill_tokens(ev)
    ev.add_argument("--batch", type=int, default=8, help="batch of the budget's workload")
    ev.add_argument("--seq", type=int, default=2048, help="tokens of the budget's workload")
    ev.add_argument("--dtype", default="float16", choices=DTYPES, help="the budget's dtype")
    ev.add_argument(
        "--tasks", help="comma-separated subset of the zero-shot tasks; none: perplexity only"
    )
    ev.add_argument("--limit", type=int, help="first N items per task (quick runs)")
    ev.add_argument("--ppl-tokens", type=int, default=8192, help="perplexity-text tokens")
    ev.add_argument("--ppl-seq-len", type=int, default=1024, help="tokens per perplexity chunk")
    ev.add_argument(
        "--text",
        metavar="FILE",
        help="perplexity on this UTF-8 file instead of the Wikipedia text: windows of "
        "--ppl-seq-len tokens, each BOS + the next --ppl-seq-len − 1 tokens of the file, "
        "tiling it from its start with stride --ppl-seq-len − 1 (no overlap, a short tail "
        "left out), the first --ppl-tokens / --ppl-seq-len of them",
    )
    ev.add_argument("--threads", type=int, help="torch CPU threads")
    ev.add_argument("--no-cache", action="store_true", help="re-evaluate masks seen before")
    ev.add_argument("--out", required=True, help="folder for results.md/.json and quality.png")
    ev.set_defaults(func=cmd_eval)
