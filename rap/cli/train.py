"""`rap train`: RLlib training of the RAP agent from a config file in `rllib_configs/`.

Registered into the main parser by `rap.cli.main.build_parser` through `add_commands`. The same
command is a KubeRay RayJob's entrypoint: with RAY_ADDRESS (or --address) set it joins that
cluster, failing with one line if it does not answer in 30 s; otherwise it starts a local Ray of
its own, never a cluster a past `ray start` left recorded. Bad input raises `RapError` (one
line, exit 2); Ray is imported lazily.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from rap.agent.train import run
from rap.core.errors import RapError


def cmd_train(args: argparse.Namespace) -> int:

    if not Path(args.config).is_file():
        raise RapError(f"config file {args.config} does not exist", expected="rllib_configs/*.py")
    if args.env_runners is not None and args.env_runners < 0:
        raise RapError(f"--env-runners {args.env_runners} is negative", expected="0 or more")
    summary = run(
        args.config,
        args.out,
        smoke=args.smoke,
        env_runners=args.env_runners,
        start_from=args.start_from,
        address=args.address,
        runner_resource=args.runner_resource,
    )
    if args.json:
        print(json.dumps(summary, indent=1))
        return 0
    last = summary["last"]
    print(
        f"{summary['algo']} trained {summary['iterations']} iterations in "
        f"{summary['wall_s']} s on Ray ({summary['ray']})"
    )
    print(f"last        return {last.get('return_mean')}, episode length {last.get('len_mean')}")
    nodes = summary["env_runner_nodes"]
    if nodes:
        print(f"env runners {len(nodes)} on Ray nodes {', '.join(sorted(set(nodes)))}")
    print(f"policy      {summary['policy']} (RLModule folder and plain export)")
    return 0


def add_commands(sub: Any) -> None:
    """Register `train` on the main parser's subparsers."""
    train = sub.add_parser("train", help="train the RAP agent with RLlib (rllib_configs/*.py)")
    train.add_argument("--config", required=True, help="e.g. rllib_configs/ppo.py")
    train.add_argument("--out", required=True, help="folder for checkpoints, logs and the policy")
    train.add_argument("--smoke", action="store_true", help="a run of seconds (CI)")
    train.add_argument("--env-runners", type=int, help="override the config's env runner count")
    train.add_argument("--start-from", help="a trained policy folder to continue from")
    train.add_argument(
        "--address",
        help="join this Ray cluster (host:port, ray://host:10001 or auto); default: RAY_ADDRESS "
        "if set, else a local Ray of its own",
    )
    train.add_argument(
        "--runner-resource",
        help="place env runners only on nodes with this custom Ray resource (one unit each; "
        "e.g. a worker group started with --resources '{\"rap_runner\": 8}')",
    )
    train.add_argument("--json", action="store_true")
    train.set_defaults(func=cmd_train)
