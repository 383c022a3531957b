"""`rap plan`: a keep-mask that fits a memory budget, from any planner or the RAP policy."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from rap.cli.common import add_prefill_tokens, set_threads
from rap.core import byte_table, memory
from rap.core.constants import DTYPES, GIB, MIB, STEP_TOKENS
from rap.core.errors import RapError
from rap.core.loading import DEFAULT_MODEL, load_config, load_model
from rap.core.scores import BlockScores
from rap.importance.calibration import (
    calibration_chunks,
)
from rap.planning import planners
from rap.planning.planners import PLANNERS
from rap.planning.policy import RapPolicy
from rap.planning.search import SEARCHES, SurrogateSearch
from rap.planning.surrogate import predicted_delta_lnppl


def _budget(args: argparse.Namespace, config: Any) -> int:

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

    config, model_id = load_config(args.model)
    budget = _budget(args, config)
    scores = BlockScores.from_file(args.scores) if args.scores else None
    # One byte accounting for every method: weights + KV at (B, S) + the activations of the
    # step the engine runs (a prefill chunk of `--prefill-tokens`, not the whole prompt).
    prefill = min(args.prefill_tokens, args.seq)
    kw = {"include_activations": True, "prefill_tokens": prefill}
    report: dict[str, Any] = {"method": args.method}
    if args.method == "oracle":
        mask, extra = _oracle(args, budget, **kw)
        report.update(extra)
    elif args.method == "rap":  # the trained agent (rap.planning.policy.RapPolicy)
        agent = RapPolicy.load(args.policy, config, model_id, args.dtype, args.min_kept_fraction)
        mask = agent.plan(budget, args.batch, args.seq, prefill)
        report.update(policy=args.policy or "default", fallback=agent.last_fallback or None)
    elif args.method in SEARCHES:  # search on the policy's own reward (the surrogate)
        search = SurrogateSearch(
            config, model_id, args.dtype, args.method, args.min_kept_fraction, args.width
        )
        mask = search.plan(budget, args.batch, args.seq, prefill)
    else:
        mask = planners.plan_mask(
            args.method,
            config,
            model_id,
            budget,
            args.batch,
            args.seq,
            args.dtype,
            scores,
            min_kept_fraction=args.min_kept_fraction,
            seed=args.seed,
            **kw,
        )
    dense = memory.dense_mask(config)
    used = byte_table.predicted_bytes(config, mask, args.batch, args.seq, args.dtype, **kw)
    report.update(
        model=model_id,
        attn=list(mask.attn),
        mlp=list(mask.mlp),
        mask=mask.model_dump(mode="json"),
        budget_bytes=budget,
        batch=args.batch,
        seq=args.seq,
        dtype=args.dtype,
        weight_bytes=memory.weight_bytes(config, mask, args.dtype),
        kv_bytes=memory.kv_bytes(config, mask, args.batch, args.seq, args.dtype),
        activation_bytes=memory.step_bytes(config, args.batch, prefill, args.dtype),
        prefill_tokens=prefill,
        step_tokens=min(args.batch * prefill, STEP_TOKENS),
        predicted_bytes=used,
        dense_bytes=byte_table.predicted_bytes(
            config, dense, args.batch, args.seq, args.dtype, **kw
        ),
        predicted_delta_lnppl=predicted_delta_lnppl(model_id, mask.key),
    )
    if args.out:
        Path(args.out).write_text(mask.to_json())
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        _print_plan(args, mask, report)
    return 0


def _print_plan(args: argparse.Namespace, mask: Any, report: dict[str, Any]) -> None:
    n, used, budget = mask.num_layers, report["predicted_bytes"], report["budget_bytes"]
    print(
        f"{args.method} plan for {report['model']} at batch {args.batch} × {args.seq} "
        f"({args.dtype})"
    )
    print(f"drop attn   {','.join(map(str, mask.dropped_attn)) or '-'}")
    print(f"drop mlp    {','.join(map(str, mask.dropped_mlp)) or '-'}")
    print(f"kept        {sum(mask.attn)}/{n} attention, {sum(mask.mlp)}/{n} MLP blocks")
    print(
        f"memory      {used / MIB:,.2f} MiB predicted of a {budget / MIB:,.2f} MiB budget "
        f"(weights {report['weight_bytes'] / MIB:,.2f}, KV {report['kv_bytes'] / MIB:,.2f}, "
        f"activations of the {report['step_tokens']}-token engine step "
        f"{report['activation_bytes'] / MIB:,.2f}; dense {report['dense_bytes'] / MIB:,.2f})"
    )
    if report["predicted_delta_lnppl"] is not None:
        print(f"quality     Δ ln ppl {report['predicted_delta_lnppl']:.4f} (surrogate estimate)")
    if "evaluations" in report:
        print(f"oracle      ppl {report['ppl']:.3f} after {report['evaluations']} evaluations")


def _oracle(args: argparse.Namespace, budget: int, **kw: Any) -> tuple[Any, dict[str, Any]]:
    from rap.importance.oracle import oracle_mask  # lazy: heavy (torch, transformers)

    set_threads(args.threads)
    model = load_model(args.model)
    ids, text = calibration_chunks(model.tokenizer, args.seq_len, args.tokens, model.dims.vocab)
    plan = oracle_mask(
        model,
        ids,
        budget,
        args.batch,
        args.seq,
        args.dtype,
        beam=args.beam,
        min_kept_fraction=args.min_kept_fraction,
        **kw,
    )
    return plan.mask, {"ppl": plan.ppl, "evaluations": plan.evaluations, "calibration": text.key}


def add_commands(sub: Any) -> None:
    """Register `plan` on the main parser's subparsers."""

    plan = sub.add_parser("plan", help="a keep-mask that fits a memory budget")
    plan.add_argument("--model", default=DEFAULT_MODEL, help="name, folder or hub id")
    size = plan.add_mutually_exclusive_group(required=True)
    size.add_argument("--budget-frac", type=float, help="fraction of dense weights + KV at B, S")
    size.add_argument("--budget-gib", type=float, help="absolute budget in GiB")
    plan.add_argument("--batch", type=int, required=True)
    plan.add_argument("--seq", type=int, required=True, help="tokens per sequence (all of it)")
    plan.add_argument("--method", required=True, choices=(*PLANNERS, *SEARCHES, "rap"))
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
    add_prefill_tokens(plan)
    plan.add_argument("--width", type=int, default=8, help="surrogate-beam: beam width")
    plan.add_argument("--seed", type=int, default=0, help="random planner's seed")
    plan.add_argument("--tokens", type=int, default=1024, help="oracle: calibration tokens")
    plan.add_argument("--seq-len", type=int, default=256, help="oracle: tokens per chunk")
    plan.add_argument("--beam", type=int, default=4, help="oracle: beam width")
    plan.add_argument("--threads", type=int, help="oracle: torch CPU threads")
    plan.add_argument("--out", help="write the KeepMask JSON here (for rap generate --mask)")
    plan.add_argument("--json", action="store_true")
    plan.set_defaults(func=cmd_plan)
