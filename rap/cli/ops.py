"""Operations commands: `rap grafana export` and `rap grafana push`.

`export` writes the dashboard JSON and a ConfigMap for Grafana's sidecar; `push` provisions the
dashboard through Grafana's HTTP API with `grafana-client`. Both build the dashboard from
rap/ops/grafana.py; nothing here imports Ray.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from rap.ops.grafana import DASHBOARD_UID, export, push


def add_commands(sub: Any) -> None:
    """Register `rap grafana ...` on the top-level subparsers."""
    grafana = sub.add_parser("grafana", help="the Grafana dashboard: export or push")
    gsub = grafana.add_subparsers(dest="action", required=True)

    export = gsub.add_parser("export", help="write the dashboard JSON and its ConfigMap")
    export.add_argument("--out", required=True, type=Path, help="folder to write into")
    export.add_argument("--namespace", default=None, help="ConfigMap namespace (default: none)")
    export.set_defaults(func=cmd_grafana_export)

    push = gsub.add_parser("push", help="create or overwrite the dashboard in a Grafana")
    push.add_argument("--url", required=True, help="Grafana's base URL, e.g. http://grafana:3000")
    push.add_argument(
        "--token",
        default=os.environ.get("GRAFANA_TOKEN"),
        help="service account token (default: $GRAFANA_TOKEN)",
    )
    push.add_argument("--folder-uid", default=None, help="folder to put it in (default: General)")
    push.add_argument("--timeout", type=float, default=10.0, help="HTTP timeout in seconds")
    push.set_defaults(func=cmd_grafana_push)


def cmd_grafana_export(args: argparse.Namespace) -> int:

    for path in export(args.out, args.namespace):
        print(path)
    return 0


def cmd_grafana_push(args: argparse.Namespace) -> int:

    out = push(args.url, args.token or "", args.folder_uid, args.timeout)
    where = f"{args.url.rstrip('/')}{out.get('url', '/d/' + DASHBOARD_UID)}"
    print(f"dashboard {out.get('uid', DASHBOARD_UID)} version {out.get('version', '?')}: {where}")
    return 0
