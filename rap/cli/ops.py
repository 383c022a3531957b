"""Operations commands: `rap grafana export` and `rap grafana push`.

`export` writes the dashboard JSON and a ConfigMap for Grafana's sidecar; `push` provisions the
dashboard through Grafana's HTTP API with `grafana-client`. Both build the dashboard from
rap/ops/grafana.py; nothing here imports Ray.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rap.cli.common import read_secret
from rap.core.errors import RapError
from rap.ops.grafana import DASHBOARD_UID, export, push


def add_commands(sub: Any) -> None:
    """Register `rap grafana ...` on the top-level subparsers."""
    grafana = sub.add_parser("grafana", help="the Grafana dashboard: export or push")
    gsub = grafana.add_subparsers(dest="action", required=True)

    export = gsub.add_parser("export", help="write the dashboard JSON and its ConfigMap")
    export.add_argument("--out", required=True, type=Path, help="folder to write into")
    export.add_argument("--namespace", default=None, help="ConfigMap namespace (default: none)")
    export.set_defaults(func=cmd_grafana_export)

    # allow_abbrev=False: a removed `--token T` must not pass as `--token-file T` (see serve.py).
    push = gsub.add_parser(
        "push", help="create or overwrite the dashboard in a Grafana", allow_abbrev=False
    )
    push.add_argument("--url", required=True, help="Grafana's base URL, e.g. http://grafana:3000")
    push.add_argument(
        "--token-file",
        default=None,
        metavar="PATH",
        help="file holding the service account token (default: $GRAFANA_TOKEN; never a flag's "
        "value, which `ps` shows)",
    )
    push.add_argument("--folder-uid", default=None, help="folder to put it in (default: General)")
    push.add_argument("--timeout", type=float, default=10.0, help="HTTP timeout in seconds")
    push.set_defaults(func=cmd_grafana_push)


def cmd_grafana_export(args: argparse.Namespace) -> int:

    for path in export(args.out, args.namespace):
        print(path)
    return 0


def cmd_grafana_push(args: argparse.Namespace) -> int:

    token = read_secret(args.token_file, "GRAFANA_TOKEN", "Grafana token")
    if not token:  # here, not in push(): the fix names this command's flag
        raise RapError("no Grafana token", fix="set GRAFANA_TOKEN or pass --token-file")
    out = push(args.url, token, args.folder_uid, args.timeout)
    where = f"{args.url.rstrip('/')}{out.get('url', '/d/' + DASHBOARD_UID)}"
    print(f"dashboard {out.get('uid', DASHBOARD_UID)} version {out.get('version', '?')}: {where}")
    return 0
