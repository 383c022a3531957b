"""The Grafana dashboard: export (JSON + sidecar ConfigMap), PromQL on exact metric names, and
`rap grafana push` against a local HTTP server that checks Grafana's documented
`POST /api/dashboards/db` (no Grafana server is installed here). Fast tier, no network."""

from __future__ import annotations

import ast
import http.server
import json
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from rap.cli.main import main
from rap.ops.grafana import (
    CONFIGMAP_FILE,
    DASHBOARD_FILE,
    DASHBOARD_UID,
    dashboard,
    queries,
    render,
)
from rap.ops.panels import SERVE_METRICS

ROOT = Path(__file__).resolve().parents[2]
CONSTRUCTORS = {"Gauge": "gauge", "Counter": "counter", "Histogram": "histogram"}
PROMQL_WORDS = {
    "sum",
    "max",
    "min",
    "avg",
    "count",
    "rate",
    "irate",
    "increase",
    "histogram_quantile",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "vector",
    "clamp_min",
}


def defined_metrics() -> dict[str, str]:
    """Exported name (with Ray's `ray_` prefix) → kind, read from deployments/metrics.py's
    source (an AST walk: importing it would import Ray Serve)."""
    tree = ast.parse((ROOT / "deployments" / "metrics.py").read_text())
    aliases = {  # `g = metrics.Gauge` and the like
        node.targets[0].id: CONSTRUCTORS[node.value.attr]
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign)
        and isinstance(node.targets[0], ast.Name)
        and isinstance(node.value, ast.Attribute)
        and node.value.attr in CONSTRUCTORS
    }
    out: dict[str, str] = {}
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not node.args:
            continue
        func = node.func
        kind = (
            aliases.get(func.id)
            if isinstance(func, ast.Name)
            else CONSTRUCTORS.get(func.attr)
            if isinstance(func, ast.Attribute)
            else None
        )
        if kind and isinstance(node.args[0], ast.Constant):
            out[f"ray_{node.args[0].value}"] = kind
    return out


def exported_names(metrics: dict[str, str]) -> set[str]:
    """The series names Prometheus sees: histograms as _bucket, _sum and _count."""
    names = set()
    for name, kind in metrics.items():
        suffixes = ("_bucket", "_sum", "_count") if kind == "histogram" else ("",)
        names |= {name + s for s in suffixes}
    return names


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: strings, label matchers, range windows and label
    lists are cut out first; what is left and is not a PromQL word is a metric."""
    s = re.sub(r'"[^"]*"', '""', expr)
    s = re.sub(r"\{[^}]*\}", "", s)
    s = re.sub(r"\[[^\]]*\]", "", s)
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", s)
    return set(re.findall(r"\b[A-Za-z_:][A-Za-z0-9_:]*", s)) - PROMQL_WORDS


def test_metric_names_parser_finds_what_it_should() -> None:
    expr = 'sum by (le) (rate(ray_x_bucket{a=~"$b",le="0.5"}[$__rate_interval])) / on() ray_y'
    assert metric_names(expr) == {"ray_x_bucket", "ray_y"}
    assert "ray_rap_budget_bytes" in defined_metrics()
    assert defined_metrics()["ray_rap_time_to_first_token_seconds"] == "histogram"


def test_export_writes_dashboard_json_and_sidecar_configmap(tmp_path: Path, capsys) -> None:
    assert main(["grafana", "export", "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out.split()
    assert sorted(Path(p).name for p in printed) == sorted([DASHBOARD_FILE, CONFIGMAP_FILE])
    dash = json.loads((tmp_path / "out" / DASHBOARD_FILE).read_text())
    assert dash["uid"] == DASHBOARD_UID and dash["panels"]
    docs = list(yaml.safe_load_all((tmp_path / "out" / CONFIGMAP_FILE).read_text()))
    assert len(docs) == 1
    cm = docs[0]
    assert (cm["apiVersion"], cm["kind"]) == ("v1", "ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"  # a string, as the sidecar wants
    assert json.loads(cm["data"][DASHBOARD_FILE]) == dash == json.loads(json.dumps(dashboard()))


def test_committed_dashboard_and_configmap_are_current() -> None:
    from rap.ops.grafana import export_texts

    for name, text in export_texts().items():
        assert (ROOT / "k8s" / "grafana" / name).read_text() == text, (
            f"run python -m rap.ops.k8s ({name})"
        )


def test_datasource_variable_is_used_everywhere() -> None:
    dash = dashboard()
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    for p in panels:
        assert p["datasource"] == "${datasource}", p["title"]
        assert p["targets"] and all(t["datasource"] == "${datasource}" for t in p["targets"])
    for v in variables.values():
        if v["type"] == "query":
            assert v["datasource"] == "${datasource}"


def test_one_row_per_concern_and_no_overlapping_panels() -> None:
    dash = dashboard()
    rows = [p["title"] for p in dash["panels"] if p["type"] == "row"]
    assert rows == ["Memory", "Masks", "Controller", "Admission", "Latency", "Throughput"]
    cells: set[tuple[int, int]] = set()
    for p in dash["panels"]:
        g = p["gridPos"]
        area = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not cells & area, f"{p['title']} overlaps another panel"
        assert g["x"] + g["w"] <= 24
        cells |= area
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])


def test_promql_uses_only_metrics_that_exist() -> None:
    allowed = exported_names(defined_metrics()) | set(SERVE_METRICS)
    used: set[str] = set()
    for expr in queries(dashboard()):
        names = metric_names(expr)
        assert names, expr
        assert names <= allowed, f"unknown metric(s) {names - allowed} in {expr}"
        used |= names
    for v in dashboard()["templating"]["list"]:
        if "definition" in v:
            metric = v["definition"].removeprefix("label_values(").split(",")[0]
            assert metric in allowed
    # Every RAP metric has a panel (a histogram through its buckets).
    shown = {re.sub(r"_bucket$", "", n) for n in used}
    assert set(defined_metrics()) <= shown, set(defined_metrics()) - shown


def test_serve_metrics_exist_in_the_installed_ray() -> None:
    import ray.serve

    source = "\n".join(p.read_text() for p in Path(ray.serve.__file__).parent.rglob("*.py"))
    for name in SERVE_METRICS:
        base = re.sub(r"_(total|bucket)$", "", name.removeprefix("ray_"))
        template = base.replace("http", "{protocol_name}")
        assert f'"{base}"' in source or f'f"{template}"' in source, name


def test_docs_glossary_names_every_metric() -> None:
    text = (ROOT / "docs" / "metrics.md").read_text()
    for name in [*defined_metrics(), *SERVE_METRICS]:
        assert f"`{name}" in text, name


def test_render_leaves_no_grafana_variable() -> None:
    for expr in queries(dashboard()):
        out = render(expr, "5m")
        assert "$" not in out, out
        assert "rate(" not in out or "[5m]" in out, out


# -- push ------------------------------------------------------------------------------------
class FakeGrafana(http.server.BaseHTTPRequestHandler):
    """Grafana's `POST /api/dashboards/db`, as documented: Bearer token, JSON body with
    `dashboard` (uid), `overwrite` and `folderUid`; 200 with id, uid, url, status, version."""

    token = "good-token"
    seen: list[dict[str, Any]] = []  # noqa: RUF012  # shared with the test on purpose

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.seen.append(
            {"path": self.path, "auth": self.headers.get("Authorization"), "body": body}
        )
        if self.path != "/api/dashboards/db":
            return self._reply(404, {"message": "Not found"})
        if self.headers.get("Authorization") != f"Bearer {self.token}":
            return self._reply(401, {"message": "invalid API key"})
        uid = body["dashboard"]["uid"]
        return self._reply(
            200,
            {"id": 7, "uid": uid, "url": f"/d/{uid}/rap-serve", "status": "success", "version": 3},
        )

    def _reply(self, status: int, out: dict[str, Any]) -> None:
        data = json.dumps(out).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:  # keep pytest's output clean
        pass


@pytest.fixture
def grafana(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    FakeGrafana.seen = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeGrafana)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_push_posts_the_documented_body_with_a_bearer_token(
    grafana: str, tmp_path: Path, capsys, monkeypatch
) -> None:
    monkeypatch.setenv("GRAFANA_TOKEN", "env-token")  # the file wins over the environment
    token_file = tmp_path / "grafana-token"
    token_file.write_text("good-token\n")
    args = ["--url", grafana, "--token-file", str(token_file), "--folder-uid", "ops"]
    assert main(["grafana", "push", *args]) == 0
    [req] = FakeGrafana.seen
    assert req["path"] == "/api/dashboards/db"
    assert req["auth"] == "Bearer good-token"
    body = req["body"]
    assert body["dashboard"]["uid"] == DASHBOARD_UID and body["dashboard"]["id"] is None
    assert body["overwrite"] is True and body["folderUid"] == "ops"
    assert body["dashboard"]["panels"] == dashboard()["panels"]
    assert f"{grafana}/d/{DASHBOARD_UID}/rap-serve" in capsys.readouterr().out


def test_push_without_folder_goes_to_general(grafana: str, monkeypatch) -> None:
    monkeypatch.setenv("GRAFANA_TOKEN", "good-token")
    assert main(["grafana", "push", "--url", grafana]) == 0
    assert "folderUid" not in FakeGrafana.seen[0]["body"]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("rap grafana: error:"), err
    return err


def test_wrong_token_is_one_clean_line(grafana: str, capsys, monkeypatch) -> None:
    monkeypatch.setenv("GRAFANA_TOKEN", "wrong")
    assert main(["grafana", "push", "--url", grafana]) == 2
    assert "401" in one_line_error(capsys)
    assert FakeGrafana.seen[0]["auth"] == "Bearer wrong"


def test_unreachable_or_malformed_url_is_one_clean_line(capsys, monkeypatch, tmp_path) -> None:
    import socket

    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("GRAFANA_TOKEN", "t")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["grafana", "push", "--url", f"http://127.0.0.1:{port}"]) == 2
    assert "no Grafana answered" in one_line_error(capsys)
    assert main(["grafana", "push", "--url", "grafana:3000"]) == 2
    assert "not an HTTP URL" in one_line_error(capsys)
    empty = tmp_path / "empty"
    empty.write_text("\n")
    assert main(["grafana", "push", "--url", "http://127.0.0.1:1", "--token-file", str(empty)]) == 2
    assert f"the Grafana token file {empty} is empty" in one_line_error(capsys)
    monkeypatch.delenv("GRAFANA_TOKEN")
    assert main(["grafana", "push", "--url", "http://127.0.0.1:1"]) == 2
    err = one_line_error(capsys)
    assert "no Grafana token" in err and "--token-file" in err
