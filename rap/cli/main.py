"""The `rap` command line: parse → build → run → report.

Every `RapError` becomes one line on stderr and exit status 2; commands print `--json` on
request. Heavy imports happen inside the commands.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

from rap.cli import bench as bench_cli
from rap.cli import campaign as campaign_cli
from rap.cli import eval as eval_cli
from rap.cli import heldout as heldout_cli
from rap.cli import importance as importance_cli
from rap.cli import plan as plan_cli
from rap.cli.ops import add_commands as add_ops_commands
from rap.cli.serve import add_commands as add_serve_commands
from rap.cli.train import add_commands as add_train_commands
from rap.core import memory
from rap.core.constants import DTYPES, MIB
from rap.core.errors import RapError
from rap.core.loading import DEFAULT_MODEL, load_config, load_model
from rap.core.masks import KeepMask


def _mib(n: int) -> str:
    return f"{n / MIB:,.2f} MiB"


def cmd_info(args: argparse.Namespace) -> int:

    config, model_id = load_config(args.model)
    info = {"model": model_id, **memory.describe(config, args.dtype)}
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"model            {model_id} ({info['model_type']}, {info['num_layers']} layers)")
    print(f"dtype            {info['dtype']} (every byte figure below)")
    print(f"attention block  {_mib(info['attn_block_bytes'])} each (norms included)")
    print(f"MLP block        {_mib(info['mlp_block_bytes'])} each (norms included)")
    print(f"resident         {_mib(info['resident_bytes'])} (embeddings, final norm, head)")
    print(f"dense weights    {_mib(info['dense_weight_bytes'])}")
    print(f"KV per token     {info['kv_bytes_per_token']:,} B over all layers")
    return 0


def _mask_from_args(args: argparse.Namespace, model_id: str, num_layers: int) -> Any:

    if args.mask and (args.drop_attn or args.drop_mlp):
        raise RapError("--mask cannot be combined with --drop-attn/--drop-mlp", fix="use one")
    if args.mask:
        mask = KeepMask.from_file(args.mask)
        mask.check_for(model_id, num_layers)
        return mask
    return KeepMask.from_drops(model_id, num_layers, args.drop_attn, args.drop_mlp)


BLANK_RUN = re.compile(r"\n(?:[ \t]*\n){3,}")
"""Three or more blank lines in a row: shown as one line that counts them."""


def display_text(text: str) -> str:
    """Generated text as `rap generate` prints it: trailing whitespace dropped, a run of blank
    lines shown as one "[N blank lines]" line, and text with nothing visible as its repr. A
    pruned model often emits nothing but newlines; printed as they are, 40 of them read as a
    command that printed nothing."""
    if not text.strip():
        shown = repr(text[:40]) + (" ..." if len(text) > 40 else "")
        return f"[no visible text: {len(text)} whitespace characters, {shown}]"

    def count(m: re.Match[str]) -> str:
        blank_lines = m.group(0).count("\n") - 1
        return f"\n[{blank_lines} blank lines]\n"

    return BLANK_RUN.sub(count, text.strip("\n").rstrip())


def cmd_generate(args: argparse.Namespace) -> int:

    if args.max_tokens < 1:
        raise RapError(f"--max-tokens {args.max_tokens} is too small", expected="at least 1")
    config, model_id = load_config(args.model)
    mask = _mask_from_args(args, model_id, config.num_hidden_layers)  # checked before loading
    model = load_model(args.model, dtype=args.dtype, device=args.device)
    dense_bytes = model.weight_bytes()
    change = model.apply(mask)
    prompt_ids = model.encode(args.prompt, chat=not args.raw)
    result = model.generate_ids([prompt_ids], args.max_tokens)
    text = model.decode(result.token_ids[0])
    seq = len(prompt_ids) + len(result.token_ids[0])
    report = {
        "text": text,
        "mask": json.loads(mask.to_json()),
        "dtype": str(model.dtype).removeprefix("torch."),
        "weight_bytes_kept": model.weight_bytes(),
        "weight_bytes_released": change.released_bytes,
        "weight_bytes_dense": dense_bytes,
        "kv_bytes_predicted": model.predicted_kv_bytes(1, seq - 1),
        "kv_bytes_measured": result.kv_bytes,
        "tokens": {"prompt": len(prompt_ids), "generated": len(result.token_ids[0])},
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    n_new = len(result.token_ids[0])
    why = "the model ended it" if n_new < args.max_tokens else f"--max-tokens {args.max_tokens}"
    print(f"model output ({n_new} tokens, {why}):")
    print(display_text(text))
    print("---")
    kept_a, kept_m = sum(mask.attn), sum(mask.mlp)
    n = mask.num_layers
    print(f"mask        {kept_a}/{n} attention and {kept_m}/{n} MLP blocks kept")
    print(
        f"weights     kept {_mib(report['weight_bytes_kept'])}, released "
        f"{_mib(change.released_bytes)} of {_mib(dense_bytes)} ({report['dtype']})"
    )
    print(
        f"KV cache    predicted {_mib(report['kv_bytes_predicted'])}, measured "
        f"{_mib(result.kv_bytes)} for 1 × {seq - 1} cached tokens"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rap", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="layers, block bytes, KV bytes per token")
    info.add_argument("--model", default=DEFAULT_MODEL, help="name, folder or hub id")
    info.add_argument("--dtype", default="float16", choices=DTYPES, help="dtype of the figures")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(func=cmd_info)

    gen = sub.add_parser("generate", help="generate text under a keep-mask")
    gen.add_argument("--model", default=DEFAULT_MODEL)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--drop-attn", default="", help="attention blocks to drop, e.g. 3,5-9")
    gen.add_argument("--drop-mlp", default="", help="MLP blocks to drop, e.g. 20-22")
    gen.add_argument("--mask", help="a KeepMask JSON file instead of --drop-*")
    gen.add_argument("--max-tokens", type=int, default=48)
    gen.add_argument("--raw", action="store_true", help="do not apply the chat template")
    gen.add_argument("--dtype", choices=DTYPES, help="default: float32 on CPU, float16 on GPU")
    gen.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if present")
    gen.add_argument("--json", action="store_true")
    gen.set_defaults(func=cmd_generate)
    add_serve_commands(sub)
    add_ops_commands(sub)
    importance_cli.add_commands(sub)
    plan_cli.add_commands(sub)
    eval_cli.add_commands(sub)
    heldout_cli.add_commands(sub)
    bench_cli.add_commands(sub)
    campaign_cli.add_commands(sub)
    add_train_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except RapError as exc:
        print(f"rap {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
