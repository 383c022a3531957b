"""The RAP Serve Grafana dashboard, generated from Python the way Ray generates its own.

Ray builds its dashboards from `Panel`/`Target` dataclasses and a base JSON with a
`${datasource}` variable (ray/dashboard/modules/metrics/). This module does the same for RAP's
metrics (deployments/metrics.py; glossary in docs/metrics.md): one row per concern (memory,
masks, controller, admission, latency, throughput), every query in PromQL on the exact exported
names (`ray_` prefix). `rap grafana export` writes the JSON and a ConfigMap for Grafana's sidecar;
`rap grafana push` provisions it through Grafana's HTTP API (`POST /api/dashboards/db`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from rap.core.errors import RapError
from rap.ops.panels import Panel, Row, rows
from rap.ops.yaml_text import dump_yaml

DASHBOARD_UID = "rap-serve"
DASHBOARD_TITLE = "RAP Serve"
DASHBOARD_FILE = "rap-serve-dashboard.json"
CONFIGMAP_FILE = "grafana-dashboard-configmap.yaml"
CONFIGMAP_NAME = "rap-serve-grafana-dashboard"
SIDECAR_LABEL = {"grafana_dashboard": "1"}  # what kube-prometheus-stack's sidecar watches

# Grafana's variables and what stands for "All" when a query is run outside Grafana.
VARIABLE_DEFAULTS = {"$deployment": ".*", "$application": ".*"}


def _variable(name: str, label: str, query: str) -> dict[str, Any]:
    """A multi-select query variable whose "All" is `.*`, as in Ray's dashboards."""
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": "${datasource}",
        "definition": query,
        "query": {"query": query, "refId": f"{name}-variable"},
        "includeAll": True,
        "allValue": ".*",
        "multi": True,
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "refresh": 2,
        "sort": 1,
        "hide": 0,
    }


def _templating() -> dict[str, Any]:
    datasource = {
        "name": "datasource",
        "label": "Data source",
        "type": "datasource",
        "query": "prometheus",
        "current": {},
        "hide": 0,
        "refresh": 1,
    }
    return {
        "list": [
            datasource,
            _variable(
                "application", "Application", "label_values(ray_rap_budget_bytes, application)"
            ),
            _variable("deployment", "Replica", "label_values(ray_rap_budget_bytes, deployment)"),
        ]
    }


def _panel_json(panel: Panel, panel_id: int, x: int, y: int) -> dict[str, Any]:
    return {
        "id": panel_id,
        "type": "timeseries",
        "title": panel.title,
        "description": panel.description,
        "datasource": "${datasource}",
        "gridPos": {"h": 8, "w": 12, "x": x, "y": y},
        "fieldConfig": {
            "defaults": {
                "unit": panel.unit,
                "custom": {
                    "fillOpacity": 30 if panel.stack else 0,
                    "stacking": {"mode": "normal" if panel.stack else "none"},
                },
            },
            "overrides": [],
        },
        "options": {
            "legend": {
                "displayMode": "table",
                "placement": "bottom",
                "calcs": ["lastNotNull", "max"],
            }
        },
        "targets": [
            {
                "datasource": "${datasource}",
                "expr": t.expr,
                "legendFormat": t.legend,
                "refId": chr(ord("A") + i),
                "range": True,
            }
            for i, t in enumerate(panel.targets)
        ],
    }


def _layout(all_rows: list[Row]) -> list[dict[str, Any]]:
    """Rows as Grafana row panels, each followed by its panels two to a line (24 columns)."""
    out: list[dict[str, Any]] = []
    y, next_id = 0, 1
    for row in all_rows:
        out.append(
            {
                "id": next_id,
                "type": "row",
                "title": row.title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
                "panels": [],
            }
        )
        next_id, y = next_id + 1, y + 1
        for i, panel in enumerate(row.panels):
            out.append(_panel_json(panel, next_id, 12 * (i % 2), y + 8 * (i // 2)))
            next_id += 1
        y += 8 * ((len(row.panels) + 1) // 2)
    return out


def dashboard() -> dict[str, Any]:
    """The whole dashboard model, ready for Grafana's import or `POST /api/dashboards/db`."""
    return {
        "uid": DASHBOARD_UID,
        "title": DASHBOARD_TITLE,
        "description": "RAP Serve: budgets, masks, controller decisions, admission, latency.",
        "tags": ["rap-serve", "ray-serve"],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "refresh": "10s",
        "schemaVersion": 39,
        "time": {"from": "now-30m", "to": "now"},
        "templating": _templating(),
        "annotations": {"list": []},
        "panels": _layout(rows()),
    }


def queries(dash: dict[str, Any]) -> list[str]:
    """Every PromQL expression the dashboard's panels hold, in order."""
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


def render(expr: str, window: str = "5m", values: dict[str, str] | None = None) -> str:
    """A dashboard query as Prometheus can run it: Grafana's interval variables become
    `window`, the dashboard's own variables their "All" value (or `values`)."""
    out = re.sub(r"\$__(rate_interval|interval|range)\b", window, expr)
    for name, value in {**VARIABLE_DEFAULTS, **(values or {})}.items():
        out = out.replace(name, value)
    return out


def configmap(dash: dict[str, Any], namespace: str | None = None) -> dict[str, Any]:
    """A ConfigMap that Grafana's dashboard sidecar loads (label `grafana_dashboard: "1"`)."""
    metadata: dict[str, Any] = {
        "name": CONFIGMAP_NAME,
        "labels": {**SIDECAR_LABEL, "app.kubernetes.io/part-of": "rap-serve"},
    }
    if namespace:
        metadata["namespace"] = namespace
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata,
        "data": {DASHBOARD_FILE: json.dumps(dash, indent=2, sort_keys=True) + "\n"},
    }


def export_texts(namespace: str | None = None) -> dict[str, str]:
    """File name → content: the dashboard JSON and its ConfigMap YAML."""

    dash = dashboard()
    header = (
        "# Generated by `rap grafana export`; do not edit (rap/ops/grafana.py is the source).\n"
    )
    return {
        DASHBOARD_FILE: json.dumps(dash, indent=2, sort_keys=True) + "\n",
        CONFIGMAP_FILE: header + dump_yaml(configmap(dash, namespace)),
    }


def export(out_dir: Path, namespace: str | None = None) -> list[Path]:
    """Write the dashboard JSON and its ConfigMap YAML into `out_dir`; return both paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in export_texts(namespace).items():
        (out_dir / name).write_text(text)
        paths.append(out_dir / name)
    return paths


class GrafanaError(RapError):
    """Grafana refused the dashboard, or no Grafana answered at the URL."""


def push(
    url: str, token: str, folder_uid: str | None = None, timeout_s: float = 10.0
) -> dict[str, Any]:
    """Create or overwrite the dashboard through `POST /api/dashboards/db` (Bearer token)."""
    import requests  # lazy: only `rap grafana push` talks HTTP
    from grafana_client import GrafanaApi  # lazy: heavy (grafana_client)
    from grafana_client.client import (  # lazy: heavy (grafana_client)
        GrafanaClientError,
        GrafanaException,
        GrafanaUnauthorizedError,
    )

    if not re.match(r"^https?://[^/\s]+", url):
        raise GrafanaError(f"--url {url!r} is not an HTTP URL", expected="e.g. http://grafana:3000")
    if not token:
        raise GrafanaError("no Grafana token", fix="set GRAFANA_TOKEN or pass --token-file")
    body: dict[str, Any] = {
        "dashboard": {**dashboard(), "id": None},  # id None + uid: create, or overwrite by uid
        "overwrite": True,
        "message": "provisioned by rap grafana push",
    }
    if folder_uid:
        body["folderUid"] = folder_uid
    api = GrafanaApi.from_url(url, credential=token, timeout=timeout_s)
    try:
        return dict(api.dashboard.update_dashboard(body))
    except GrafanaUnauthorizedError:
        raise GrafanaError(
            f"Grafana at {url} refused the token (401)", fix="pass a valid service account token"
        ) from None
    except GrafanaClientError as exc:
        raise GrafanaError(f"Grafana at {url} answered {exc.status_code}: {exc.message}") from None
    except GrafanaException as exc:
        raise GrafanaError(f"Grafana at {url} failed: {exc.message}") from None
    except requests.exceptions.RequestException as exc:
        raise GrafanaError(
            f"no Grafana answered at {url} ({type(exc).__name__})", fix="check --url"
        ) from None
