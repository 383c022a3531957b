"""`rap importance`, `rap plan` and `rap eval`: block scores, budget planners, quality at budgets.

Registered into the main parser by `rap.cli.main.build_parser` through `add_commands`. Every command
takes an `argparse.Namespace` and returns an exit code; bad input raises a `RapError` (one line,
exit 2). Heavy imports stay inside the commands.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rap.core.constants import DTYPES, GIB, MIB
from rap.core.errors import RapError
from rap.core.loading import DEFAULT_MODEL


def _tqdm_progress(desc: str) -> Callable[[int, int, str], None]:
    """A progress callback that drives one tqdm bar (created on the first call)."""
    from tqdm import tqdm

    bar: list[Any] = []

    def update(done: int, total: int, note: str) -> None:
        if not bar:
            bar.append(tqdm(total=total, desc=desc, unit="step"))
        bar[0].set_postfix_str(note)
        bar[0].update(done - bar[0].n)
        if done >= total:
            bar[0].close()

    return update


def _threads(n: int | None) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


def cmd_importance(args: argparse.Namespace) -> int:
    from rap.core.loading import load_model
    from rap.importance.scorers import ScoreSettings, get_scores

    if args.tokens < args.seq_len:
        raise RapError(f"--tokens {args.tokens} is below --seq-len {args.seq_len}")
    _threads(args.threads)
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
    progress = _tqdm_progress(f"{args.method} {model.model_id}")
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


def _budget(args: argparse.Namespace, config: Any) -> int:
    from rap.core import memory

    if args.batch < 1 or args.seq < 1:
        raise RapError(f"batch {args.batch} × seq {args.seq} is empty", expected="both ≥ 1")
    if args.budget_gib is not None:
        if args.budget_gib <= 0:
            raise RapError(f"--budget-gib {args.budget_gib} is not positive")
        return int(args.budget_gib * GIB)
    if not 0.0 < args.budget_frac <= 1.0:
        raise RapError(f"--budget-frac {args.budget_frac} is outside (0, 1]", expected="0 < F ≤ 1")
    return memory.budget_bytes(config, args.budget_frac, args.batch, args.seq, args.dtype)


def cmd_plan(args: argparse.Namespace) -> int:
    from rap.core import memory
    from rap.core.loading import load_config
    from rap.core.scores import BlockScores
    from rap.planning import planners

    config, model_id = load_config(args.model)
    budget = _budget(args, config)
    scores = BlockScores.from_file(args.scores) if args.scores else None
    kw = {"include_activations": args.include_activations, "prefill_tokens": args.prefill_tokens}
    report: dict[str, Any] = {"method": args.method}
    if args.method == "oracle":
        mask, extra = _oracle(args, budget, **kw)
        report.update(extra)
    elif args.method == "rap":  # the trained agent (rap.planning.policy.RapPolicy); activations counted
        from rap.planning.policy import RapPolicy

        agent = RapPolicy.load(args.policy, config, model_id, args.dtype, args.min_kept_fraction)
        mask = agent.plan(budget, args.batch, args.seq, args.prefill_tokens)
        args.include_activations = kw["include_activations"] = True  # what the agent plans for
        report.update(policy=args.policy or "default", fallback=agent.last_fallback or None)
    else:
        mask = planners.plan_mask(
            args.method, config, model_id, budget, args.batch, args.seq, args.dtype, scores,
            min_kept_fraction=args.min_kept_fraction, seed=args.seed, **kw,
        )  # fmt: skip
    dense = memory.dense_mask(config)
    used = byte_table.predicted_bytes(config, mask, args.batch, args.seq, args.dtype, **kw)
    report.update(
        model=model_id, attn=list(mask.attn), mlp=list(mask.mlp), mask=mask.model_dump(mode="json"),
        budget_bytes=budget, batch=args.batch, seq=args.seq, dtype=args.dtype,
        weight_bytes=memory.weight_bytes(config, mask, args.dtype),
        kv_bytes=memory.kv_bytes(config, mask, args.batch, args.seq, args.dtype),
        predicted_bytes=used,
        dense_bytes=byte_table.predicted_bytes(config, dense, args.batch, args.seq, args.dtype, **kw),
        activations_counted=args.include_activations,
    )  # fmt: skip
    if args.out:
        Path(args.out).write_text(mask.to_json())
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        _print_plan(args, mask, report)
    return 0


def _print_plan(args: argparse.Namespace, mask: Any, report: dict[str, Any]) -> None:
    n, used, budget = mask.num_layers, report["predicted_bytes"], report["budget_bytes"]
    print(f"{args.method} plan for {report['model']} at batch {args.batch} × {args.seq} "
          f"({args.dtype})")  # fmt: skip
    print(f"drop attn   {','.join(map(str, mask.dropped_attn)) or '-'}")
    print(f"drop mlp    {','.join(map(str, mask.dropped_mlp)) or '-'}")
    print(f"kept        {sum(mask.attn)}/{n} attention, {sum(mask.mlp)}/{n} MLP blocks")
    print(f"memory      {used / MIB:,.2f} MiB predicted of a {budget / MIB:,.2f} MiB budget "
          f"(weights {report['weight_bytes'] / MIB:,.2f}, KV {report['kv_bytes'] / MIB:,.2f}; "
          f"dense {report['dense_bytes'] / MIB:,.2f})")  # fmt: skip
    if "evaluations" in report:
        print(f"oracle      ppl {report['ppl']:.3f} after {report['evaluations']} evaluations")


def _oracle(args: argparse.Namespace, budget: int, **kw: Any) -> tuple[Any, dict[str, Any]]:
    from rap.core.loading import load_model
    from rap.importance.calibration import calibration_chunks
    from rap.importance.oracle import oracle_mask

    _threads(args.threads)
    model = load_model(args.model)
    ids, text = calibration_chunks(model.tokenizer, args.seq_len, args.tokens, model.dims.vocab)
    plan = oracle_mask(
        model, ids, budget, args.batch, args.seq, args.dtype, beam=args.beam,
        min_kept_fraction=args.min_kept_fraction, **kw,
    )  # fmt: skip
    return plan.mask, {"ppl": plan.ppl, "evaluations": plan.evaluations, "calibration": text.key}


def _parse_list(text: str, flag: str, cast: Callable[[str], Any]) -> list[Any]:
    try:
        return [cast(x.strip()) for x in text.split(",") if x.strip()]
    except ValueError:
        raise RapError(f"{flag} {text!r} is not a comma-separated list") from None


def _eval_plan(args: argparse.Namespace, model: Any) -> tuple[list[dict[str, Any]], list[Any]]:
    """Rows (budget, method) with their masks; a budget a method cannot meet becomes a row
    with its error, not a failure."""
    from rap.core import memory
    from rap.core.errors import BudgetError
    from rap.planning import planners

    rows: list[dict[str, Any]] = []
    masks = []
    for frac in args.budget_list:
        budget = memory.budget_bytes(model.config, frac, args.batch, args.seq, args.dtype)
        for method in args.method_list:
            row: dict[str, Any] = {"budget": frac, "method": method, "budget_bytes": budget}
            try:
                mask = planners.plan_mask(
                    method, model.config, model.model_id, budget, args.batch, args.seq,
                    args.dtype, seed=args.seed,
                )  # fmt: skip
            except BudgetError:
                floor = planners.minimum_bytes(
                    method, model.config, model.model_id, args.batch, args.seq, args.dtype
                )
                row["error"] = f"needs ≥ {floor / MIB:,.1f} MiB"
                rows.append(row)
                continue
            row.update(
                attn=list(mask.attn), mlp=list(mask.mlp), blocks=2 * mask.num_layers,
                blocks_kept=sum(mask.attn) + sum(mask.mlp),
                predicted_bytes=byte_table.predicted_bytes(
                    model.config, mask, args.batch, args.seq, args.dtype),
            )  # fmt: skip
            rows.append(row)
            masks.append(mask)
    return rows, masks


def _eval_command(args: argparse.Namespace) -> str:
    """The command line that reproduces a result (every option that changes it)."""
    parts = [
        f"rap eval --model {args.model} --budgets {args.budgets} --methods {args.methods}",
        f"--batch {args.batch} --seq {args.seq} --dtype {args.dtype}",
        f"--ppl-tokens {args.ppl_tokens} --ppl-seq-len {args.ppl_seq_len} --seed {args.seed}",
    ]
    if args.limit is not None:
        parts.append(f"--limit {args.limit}")
    if args.tasks:
        parts.append(f"--tasks {args.tasks}")
    return " ".join(parts) + f" --out {args.out}"


def _check_eval_args(args: argparse.Namespace) -> list[str]:
    """Parse and check the lists before any model loads; returns the tasks."""
    from rap.importance.zeroshot import TASKS
    from rap.planning.planners import SERVING_PLANNERS

    args.budget_list = _parse_list(args.budgets, "--budgets", float)
    args.method_list = _parse_list(args.methods, "--methods", str)
    tasks = _parse_list(args.tasks, "--tasks", str) if args.tasks else list(TASKS)
    for frac in args.budget_list:
        if not 0.0 < frac <= 1.0:
            raise RapError(f"budget {frac} is outside (0, 1]", expected="fractions like 0.8")
    for method in args.method_list:
        if method in ("rap", "oracle"):
            raise RapError(f"rap eval does not run method {method!r}",
                           expected=f"some of {', '.join(SERVING_PLANNERS)}",
                           fix="compare the RAP policy with bench/compare_policies.py")  # fmt: skip
        if method not in SERVING_PLANNERS:
            raise RapError(f"unknown method {method!r}",
                           expected=f"some of {', '.join(SERVING_PLANNERS)}")  # fmt: skip
    for task in tasks:
        if task not in TASKS:
            raise RapError(f"unknown task {task!r}", expected=f"some of {', '.join(TASKS)}")
    if args.limit is not None and args.limit < 1:
        raise RapError(f"--limit {args.limit} is too small", expected="at least 1")
    return tasks


def cmd_eval(args: argparse.Namespace) -> int:
    from rap.core.loading import load_model
    from rap.importance import report
    from rap.importance.calibration import perplexity_chunks
    from rap.importance.evaluate import evaluate_masks

    tasks = _check_eval_args(args)
    _threads(args.threads)
    model = load_model(args.model)
    vocab = model.dims.vocab
    _, text = perplexity_chunks(model.tokenizer, args.ppl_seq_len, args.ppl_tokens, vocab)
    rows, masks = _eval_plan(args, model)
    cache = None
    if not args.no_cache:
        from rap.core.loading import cache_dir
        from rap.importance.scorers import model_digest

        cache = cache_dir() / "eval" / f"{model_digest(model)[:16]}.json"
    quality = evaluate_masks(
        model, masks, tasks, args.limit, args.ppl_tokens, args.ppl_seq_len,
        _tqdm_progress(f"eval {model.model_id}"), cache,
    )  # fmt: skip
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
    from rap.core import memory
    from rap.importance.calibration import PERPLEXITY_SOURCE, SOURCES
    from rap.importance.zeroshot import task_size
    from rap.planning.planners import SCORES_FOR

    counts = {t: min(args.limit or task_size(t), task_size(t)) for t in tasks}
    dense = memory.dense_mask(model.config)
    return {
        "model": model.model_id,
        "command": _eval_command(args),
        "workload": {
            "batch": args.batch, "seq": args.seq, "dtype": args.dtype,
            "dense_bytes": memory.weight_bytes(model.config, dense, args.dtype)
            + memory.kv_bytes(model.config, dense, args.batch, args.seq, args.dtype),
        },
        "perplexity_text": {**text.model_dump(), "file": SOURCES[PERPLEXITY_SOURCE]},
        "limit": args.limit,
        "tasks": counts,
        "ci95_max": max((1.96 * (0.25 / n) ** 0.5 for n in counts.values()), default=0.0),
        "methods": args.method_list,
        "budgets": args.budget_list,
        "score_sources": {m: SCORES_FOR.get(m, "seed") for m in args.method_list},
        "compute_dtype": str(model.dtype).removeprefix("torch."),
        "device": str(model.device),
        "rows": rows,
    }  # fmt: skip


def add_commands(sub: Any) -> None:
    """Register `importance`, `plan` and `eval` on the main parser's subparsers."""
    _add_importance(sub)
    _add_plan(sub)
    _add_eval(sub)


def _add_importance(sub: Any) -> None:
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


def _add_plan(sub: Any) -> None:
    from rap.planning.planners import PLANNERS  # light: no torch

    plan = sub.add_parser("plan", help="a keep-mask that fits a memory budget")
    plan.add_argument("--model", default=DEFAULT_MODEL, help="name, folder or hub id")
    size = plan.add_mutually_exclusive_group(required=True)
    size.add_argument("--budget-frac", type=float, help="fraction of dense weights + KV at B, S")
    size.add_argument("--budget-gib", type=float, help="absolute budget in GiB")
    plan.add_argument("--batch", type=int, required=True)
    plan.add_argument("--seq", type=int, required=True, help="tokens per sequence (all of it)")
    plan.add_argument("--method", required=True, choices=(*PLANNERS, "rap"))
    plan.add_argument("--policy", help="rap: an exported policy folder (default: the shipped one)")
    plan.add_argument("--dtype", default="float16", choices=DTYPES, help="serving dtype")
    plan.add_argument("--scores", help="a BlockScores JSON (default: shipped or cached scores)")
    plan.add_argument(
        "--min-kept-fraction",
        type=float,
        default=0.0,
        help="quality floor: fewest blocks kept, as a share of all (default 0.0, no floor; "
        "serving's default is 0.5: pass 0.5 to plan as a replica would)",
    )
    plan.add_argument("--include-activations", action="store_true", help="count activations")
    plan.add_argument("--prefill-tokens", type=int, help="prompt tokens for activations")
    plan.add_argument("--seed", type=int, default=0, help="random planner's seed")
    plan.add_argument("--tokens", type=int, default=1024, help="oracle: calibration tokens")
    plan.add_argument("--seq-len", type=int, default=256, help="oracle: tokens per chunk")
    plan.add_argument("--beam", type=int, default=4, help="oracle: beam width")
    plan.add_argument("--threads", type=int, help="oracle: torch CPU threads")
    plan.add_argument("--out", help="write the KeepMask JSON here (for rap generate --mask)")
    plan.add_argument("--json", action="store_true")
    plan.set_defaults(func=cmd_plan)


def _add_eval(sub: Any) -> None:
    ev = sub.add_parser("eval", help="perplexity and zero-shot accuracy at memory budgets")
    ev.add_argument("--model", default=DEFAULT_MODEL, help="name, folder or hub id")
    ev.add_argument("--budgets", default="1.0,0.8,0.6", help="fractions of dense weights + KV")
    ev.add_argument(
        "--methods",
        default="gsi,oneshot,mem-greedy,shortgpt,attn-drop,mlp-drop,random",
        help="stored-score planners: gsi, oneshot, mem-greedy, shortgpt, attn-drop, mlp-drop, "
        "random (not rap or oracle: bench/compare_policies.py compares the RAP policy); no "
        "quality floor",
    )
    ev.add_argument("--batch", type=int, default=8, help="batch of the budget's workload")
    ev.add_argument("--seq", type=int, default=2048, help="tokens of the budget's workload")
    ev.add_argument("--dtype", default="float16", choices=DTYPES, help="the budget's dtype")
    ev.add_argument("--tasks", help="comma-separated subset of the zero-shot tasks")
    ev.add_argument("--limit", type=int, help="first N items per task (quick runs)")
    ev.add_argument("--ppl-tokens", type=int, default=8192, help="perplexity-text tokens")
    ev.add_argument("--ppl-seq-len", type=int, default=1024, help="tokens per perplexity chunk")
    ev.add_argument("--seed", type=int, default=0, help="random planner's seed")
    ev.add_argument("--threads", type=int, help="torch CPU threads")
    ev.add_argument("--no-cache", action="store_true", help="re-evaluate masks seen before")
    ev.add_argument("--out", required=True, help="folder for results.md/.json and quality.png")
    ev.set_defaults(func=cmd_eval)
