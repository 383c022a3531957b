"""`rap serve` without Ray: its token file per server, what it prints, and how it starts Serve."""

from __future__ import annotations

import argparse
import logging
import shlex
import socket
import sys
import types
from types import SimpleNamespace

import pytest

from rap.cli import serve as serve_cli
from rap.cli.admin_token import admin_token, check_port_free
from rap.cli.main import build_parser, main
from rap.core.constants import GIB
from rap.core.errors import RapError


def test_each_server_keeps_its_generated_token_in_a_file_of_its_own(tmp_path, monkeypatch):
    """Two servers on one machine (or a test run beside a server): neither rewrites the file
    whose path the other printed."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("RAP_ADMIN_TOKEN", raising=False)
    first, (where_first, _) = admin_token(None, "RAP_ADMIN_TOKEN", 8000)
    second, (where_second, _) = admin_token(None, "RAP_ADMIN_TOKEN", 8123)
    assert first != second and where_first != where_second
    assert (tmp_path / "rap" / "admin-token-8000").read_text().strip() == first
    assert (tmp_path / "rap" / "admin-token-8123").read_text().strip() == second


@pytest.fixture
def listening_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def _no_ray(*_args) -> None:
    raise AssertionError("Ray would start here")


def test_a_port_in_use_stops_serve_before_it_writes_a_token(
    listening_port, tmp_path, monkeypatch, capsys
):
    """A second `rap serve --port P` must not overwrite the token of the server on P."""
    import rap.serving.config

    class Policy:
        def describe(self) -> dict:
            return {"kind": "Fake", "origin": "test", "decisions": 0, "fallbacks": 0}

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("RAP_ADMIN_TOKEN", raising=False)
    monkeypatch.setattr(serve_cli, "load_config", lambda _model: None)
    monkeypatch.setattr(rap.serving.config, "controller_policy", lambda _cfg: Policy())
    monkeypatch.setattr(serve_cli, "_start", _no_ray)
    assert main(["serve", "--port", str(listening_port)]) == 2
    err = capsys.readouterr().err
    assert f"port {listening_port} on 127.0.0.1 is in use (another rap serve?)" in err
    assert "pass --port with a free port" in err
    assert not (tmp_path / "rap").exists()
    with socket.socket() as s:  # a free port passes
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    check_port_free("127.0.0.1", free)
    with pytest.raises(RapError, match="in use"):
        check_port_free("127.0.0.1", listening_port)


def _first_answer() -> dict:
    return {
        "model": "m",
        "choices": [{"message": {"content": "Paris."}}],
        "system_fingerprint": "rap-x",
        "usage": {"total_tokens": 9},
    }


def test_the_operator_hint_sends_the_token_to_this_server(tmp_path, capsys) -> None:
    """`rap budget set` defaults to port 8000; the printed command names the server's URL."""
    url = "http://127.0.0.1:8123"
    token_file = tmp_path / "admin-token-8123"
    serve_cli._report(url, ("in F", f" --token-file {token_file}"), _first_answer(), False, 9)
    [hint] = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("operator: ")]
    args = build_parser().parse_args(shlex.split(hint.removeprefix("operator: rap ")))
    assert args.url == url and args.token_file == str(token_file) and args.replica == "replica-0"
    serve_cli._report(url, ("from $T", "  # the token from $T"), _first_answer(), False, 9)
    [hint] = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("operator: ")]
    words = shlex.split(hint.removeprefix("operator: rap "), comments=True)  # as a shell reads it
    assert build_parser().parse_args(words).url == url


def test_start_up_ends_with_the_budgets_then_the_controller(monkeypatch, capsys) -> None:
    state = {
        "replicas": {
            "replica-1": {"budget_bytes": int(0.5 * GIB)},
            "replica-0": {"error": "unreachable: TimeoutError"},
        },
        "controller": {
            "policy": {"kind": "K", "origin": "o", "decisions": 1, "fallbacks": 0},
        },
    }
    monkeypatch.setattr(serve_cli, "http_json", lambda *_a, **_k: state)
    serve_cli._report_state("http://h:1", "tok")
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "budgets: replica-0 unreachable: TimeoutError, replica-1 0.500 GiB",
        "controller: K (o): 1 decisions, 0 fallbacks",
    ]


def test_the_default_cpu_budget_the_help_states_is_the_replicas() -> None:
    """What a replica starts with on a CPU (its own code path), for the default model."""
    from pathlib import Path

    import torch

    from rap.core.arch import dims_of
    from rap.core.loading import DEFAULT_MODEL, load_config
    from rap.core.masks import KeepMask
    from rap.serving.config import ServeAppConfig
    from rap.serving.telemetry import initial_budget_bytes

    config, model_id = load_config(DEFAULT_MODEL)
    dims = dims_of(config)
    model = SimpleNamespace(  # what initial_budget_bytes reads of a PrunableModel on a CPU
        device=torch.device("cpu"),
        config=config,
        dtype=torch.float32,
        dims=dims,
        dense_mask=lambda: KeepMask.dense(model_id, dims.num_layers),
    )
    cfg = ServeAppConfig(device="cpu").resolved()
    budget_bytes = initial_budget_bytes(model, None, cfg)
    assert f"{budget_bytes / GIB:.2f}" == serve_cli.DEFAULT_CPU_BUDGET_GIB
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    assert f"about {serve_cli.DEFAULT_CPU_BUDGET_GIB} GiB for the" in readme


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_serve_starts_without_the_reconnect_notice(monkeypatch) -> None:
    """`serve.run` takes no HTTP options, so after `serve.start(http_options=...)` Ray logs that
    new options "will not be applied" (it reads as if --port were ignored); that notice is
    dropped, every other Serve message still shows."""
    serve_logger = logging.getLogger("ray.serve")
    records = _Records()
    monkeypatch.setattr(serve_logger, "filters", [])
    monkeypatch.setattr(serve_logger, "handlers", [records])
    monkeypatch.setattr(serve_logger, "level", logging.INFO)
    started: list[dict] = []

    def run(_app, **_kw) -> None:  # as Ray 2.60's serve.run logs it, on "ray.serve"
        serve_logger.info(
            'Connecting to existing Serve app in namespace "serve". New '
            "http_options/controller_options will not be applied."
        )
        serve_logger.info("Application 'rap' is ready")

    serve = types.ModuleType("ray.serve")
    serve.start = lambda http_options: started.append(http_options)  # type: ignore[attr-defined]
    serve.run = run  # type: ignore[attr-defined]
    ray = types.ModuleType("ray")
    ray.init = lambda **_kw: None  # type: ignore[attr-defined]
    ray.serve = serve  # type: ignore[attr-defined]
    app = types.ModuleType("deployments.app")
    app.build_app = lambda cfg: cfg  # type: ignore[attr-defined]
    for name, module in (("ray", ray), ("ray.serve", serve), ("deployments.app", app)):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(serve_cli.signal, "signal", lambda *_a: None)
    config = SimpleNamespace(model_dump=lambda mode: {})
    serve_cli._start(config, argparse.Namespace(host="127.0.0.1", port=8123), 9999)
    assert started == [{"host": "127.0.0.1", "port": 8123}]  # the port, set once
    assert records.messages == ["Application 'rap' is ready"]
