"""`rap serve` (local Ray + the Serve app, one command) and `rap budget set` (an operator's act).

Ray and Serve are imported inside the commands: the library never imports Ray Serve, and the
command line reaches the deployments lazily.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from typing import Any

from pydantic import ValidationError

from rap.cli.admin_token import admin_token, check_port_free
from rap.cli.common import read_secret
from rap.core.constants import GIB
from rap.core.errors import RapError
from rap.core.loading import DEFAULT_MODEL, load_config
from rap.ops.ray_env import patient_serve_env

DEFAULT_CPU_BUDGET_GIB = "0.86"
"""A replica's budget on a CPU when none is configured, for the default model in float32, as
the help text states it (`rap.serving.telemetry.initial_budget_bytes`: the dense model's peak at
the engine's batch 8 × 1,024 tokens; tests/cli/test_cli.py recomputes it). `rap serve` prints
the budgets the replicas really start with."""


def add_commands(sub: Any) -> None:
    # allow_abbrev=False: else argparse would take a removed `--api-key K` (or `--token T`) as
    # `--api-key-file K` and echo the secret K in its "cannot read" error.
    serve = sub.add_parser(
        "serve", help="start Ray and the RAP Serve app; keep serving", allow_abbrev=False
    )
    serve.add_argument("--model", default=DEFAULT_MODEL)
    serve.add_argument("--replicas", type=int, default=2, help="number of model replicas")
    serve.add_argument(
        "--budget-gib",
        default="",
        help="comma-separated budgets per replica in GiB (default: from the device; on a CPU "
        f"the dense model's peak at batch 8 × 1,024 tokens, {DEFAULT_CPU_BUDGET_GIB} GiB for "
        "the default model in float32; printed at start-up)",
    )
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument(
        "--metrics-port",
        type=int,
        default=0,
        help="port of Ray's Prometheus endpoint (default: a free port, printed at start-up)",
    )
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument(
        "--policy",
        default="default",
        help="the controller's planner: 'default' (surrogate-greedy search for the default "
        "model, the test split's winner; mem-greedy for other models), 'rap' (the shipped RAP "
        "policy), a folder exported by `rap train`, or 'none' (heuristic mem-greedy)",
    )
    # Secrets come from the environment or a file, never a flag's value: `ps` shows those.
    serve.add_argument(
        "--api-key-file",
        default=None,
        metavar="PATH",
        help="require the key in this file on /v1, as vLLM's --api-key does (default: "
        "$RAP_API_KEY; neither: no key needed)",
    )
    serve.add_argument(
        "--admin-token-file",
        default=None,
        metavar="PATH",
        help="the admin token, in this file (default: $RAP_ADMIN_TOKEN; neither: a random one, "
        "written to ~/.cache/rap/admin-token-PORT, readable by you only)",
    )
    serve.add_argument(
        "--exit-after-first",
        action="store_true",
        help="stop after the first request (for smoke tests)",
    )
    serve.set_defaults(func=cmd_serve)

    budget = sub.add_parser("budget", help="operator actions on budgets")
    bsub = budget.add_subparsers(dest="action", required=True)
    bset = bsub.add_parser("set", help="change a replica's budget at run time", allow_abbrev=False)
    bset.add_argument("--replica", required=True)
    bset.add_argument("--gib", type=float, required=True)
    bset.add_argument(
        "--token-file",
        default=None,
        metavar="PATH",
        help="file holding the admin token (default: $RAP_ADMIN_TOKEN)",
    )
    bset.add_argument(
        "--url",
        default="http://127.0.0.1:8000",
        help="the server (rap serve prints its own in this command's hint)",
    )
    bset.set_defaults(func=cmd_budget_set)


def http_json(
    url: str, body: dict[str, Any] | None = None, token: str | None = None, timeout_s: float = 120.0
) -> dict[str, Any]:
    """POST (or GET without a body) JSON; a RapError with the server's message on failure."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method="POST" if data else "GET")
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return dict(json.loads(resp.read()))
    except urllib.error.HTTPError as exc:
        detail = json.loads(exc.read() or b"{}").get("error", {}).get("message", exc.reason)
        raise RapError(f"{url} answered {exc.code}: {detail}") from None
    except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
        raise RapError(
            f"no RAP Serve answered at {url} ({exc})", fix="start it with `rap serve` or pass --url"
        ) from None


def cmd_budget_set(args: argparse.Namespace) -> int:
    token = read_secret(args.token_file, "RAP_ADMIN_TOKEN", "admin token")
    if not token:
        raise RapError(
            "no admin token",
            fix="set RAP_ADMIN_TOKEN or pass --token-file "
            "(rap serve writes one and prints its path)",
        )
    out = http_json(f"{args.url}/admin/budget", {"replica": args.replica, "gib": args.gib}, token)
    print(f"{out['replica']}: budget {out['budget_bytes'] / GIB:.3f} GiB")
    return 0


def _app_config(args: argparse.Namespace) -> dict[str, Any]:
    budgets = [float(b) for b in args.budget_gib.split(",") if b.strip()]
    if budgets and len(budgets) != args.replicas:
        raise RapError(
            f"--budget-gib has {len(budgets)} values", expected=f"one per replica ({args.replicas})"
        )
    return {
        "model": args.model,
        "policy": None if args.policy.lower() in ("none", "null") else args.policy,
        "replicas": [
            {
                "name": f"replica-{i}",
                "budget_gib": budgets[i] if budgets else None,
                "num_cpus": round(1.0 / args.replicas, 3),
            }
            for i in range(args.replicas)
        ],
    }


def cmd_serve(args: argparse.Namespace) -> int:
    """Parse and check (before Ray starts) → start Ray and the app → first request → report →
    serve until Ctrl-C or SIGTERM."""
    from rap.serving.config import controller_policy  # lazy: heavy (torch, transformers)

    config = _validated(args)
    load_config(args.model)  # convert the default model once, before replicas race to do it
    policy = controller_policy(config.resolved())  # one error line now, before Ray starts
    print(f"controller policy: {_policy_line(policy.describe())}", flush=True)
    # After the checks above, so a rejected start (the port held by another server included)
    # writes no token file; before Ray starts.
    check_port_free(args.host, args.port)
    api_key = read_secret(args.api_key_file, config.api_key_env, "API key")
    token, token_lines = admin_token(args.admin_token_file, config.admin_token_env, args.port)
    os.environ[config.admin_token_env] = token  # inherited by Ray's workers
    if api_key:
        os.environ[config.api_key_env] = api_key
    url = f"http://{args.host}:{args.port}"
    metrics_port = args.metrics_port or _free_port()
    try:
        _start(config, args, metrics_port)
        first = _first_request(url, api_key)
        _report(url, token_lines, first, api_key is not None, metrics_port)
        _report_state(url, token)
        while not args.exit_after_first:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:  # an error while starting stops Ray too
        _stop()
    print("RAP Serve stopped")
    return 0


def _validated(args: argparse.Namespace) -> Any:

    from rap.serving.config import ServeAppConfig  # lazy: heavy (torch, transformers)

    try:
        return ServeAppConfig.model_validate(_app_config(args))
    except ValidationError as exc:
        msg = str(exc.errors()[0]["msg"]).removeprefix("Value error, ")
        raise RapError(f"invalid serve configuration: {msg}") from None


def _report(
    url: str,
    token_lines: tuple[str, str],
    first: dict[str, Any],
    keyed: bool,
    metrics_port: int,
) -> None:
    """What a user needs once the app answers: where, a first answer, how to call it, how to act
    on it, where its metrics are, and which policy plans. No secret is printed."""
    print(f"RAP Serve is up at {url}  (OpenAI-compatible: {url}/v1)")
    print(f"admin token: {token_lines[0]}")
    print(
        "first request: POST /v1/chat/completions "
        '{"messages": [{"role": "user", "content": "What is the capital of France?"}]}'
    )
    print(
        f"  → {first['choices'][0]['message']['content']!r} "
        f"[{first['system_fingerprint']}, {first['usage']['total_tokens']} tokens]"
    )
    auth = ' -H "Authorization: Bearer $RAP_API_KEY"' if keyed else ""
    print(
        f"try: curl {url}/v1/completions -H 'Content-Type: application/json'{auth} "
        f'-d \'{{"model": "{first["model"]}", "prompt": "Once upon a time"}}\''
        + ("  (with RAP_API_KEY set to the API key)" if keyed else "")
    )
    # --url: `rap budget set` defaults to port 8000, where another server (or anything else)
    # may listen; the token must go to this one.
    hint = f"rap budget set --url {url} --replica replica-0 --gib 0.4{token_lines[1]}"
    print(f"operator: {hint}")
    print(f"metrics: http://127.0.0.1:{metrics_port}/metrics (Prometheus; docs/metrics.md)")


def _free_port() -> int:

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _policy_line(d: dict[str, Any]) -> str:
    return f"{d['kind']} ({d['origin']}): {d['decisions']} decisions, {d['fallbacks']} fallbacks"


def _report_state(url: str, token: str) -> None:
    """The replicas' budgets and the live controller's policy, from /admin/state; "controller:"
    is the last start-up line."""
    try:
        state = http_json(f"{url}/admin/state", token=token, timeout_s=10)
    except RapError as exc:
        print(f"budgets: state unavailable ({exc})")
        print(f"controller: state unavailable ({exc})")
        return
    print(f"budgets: {_budgets_line(state.get('replicas', {}))}")
    try:
        print(f"controller: {_policy_line(state['controller']['policy'])}")
    except KeyError as exc:
        print(f"controller: state unavailable (no {exc} in /admin/state)")


def _budgets_line(replicas: dict[str, Any]) -> str:
    """Each replica's budget now, e.g. "replica-0 0.861 GiB, replica-1 0.861 GiB"."""
    parts = []
    for name, tel in sorted(replicas.items()):
        if "budget_bytes" in tel:
            parts.append(f"{name} {tel['budget_bytes'] / GIB:.3f} GiB")
        else:
            parts.append(f"{name} {tel.get('error', 'unknown')}")
    return ", ".join(parts) or "no replica answered"


def _interrupt(_signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt


def _start(config: Any, args: argparse.Namespace, metrics_port: int) -> None:
    import ray  # lazy: heavy (ray)
    from ray import serve  # lazy: heavy (ray)

    from deployments.app import build_app  # lazy: heavy (torch, transformers, ray)

    # Serve's HTTP proxy (uvicorn) would take a local client's X-Forwarded-For as its address,
    # so any local process could pick its rate-limit bucket; the router decides whom to believe
    # (http.trusted_proxies). The proxy inherits this from the driver's environment.
    os.environ.setdefault("FORWARDED_ALLOW_IPS", "")
    patient_serve_env()  # a loaded machine's proxy starts slowly (rap.ops.ray_env)
    # A Ray of its own, even where `ray start` left a cluster running (use `serve deploy` there).
    ray.init(
        address="local",
        include_dashboard=False,
        logging_level=logging.WARNING,
        log_to_driver=False,
        _metrics_export_port=metrics_port,
    )
    # SIGTERM (kill, a container stop) shuts down like Ctrl-C: ray.init just installed a handler
    # that aborts the process with a stack dump, so ours replaces it at once.
    signal.signal(signal.SIGTERM, _interrupt)
    serve.start(http_options={"host": args.host, "port": args.port})
    _quiet_serve_reconnect_notice()
    serve.run(build_app(config.model_dump(mode="json")), name="rap", route_prefix="/")


SERVE_RECONNECT_NOTICE = "Connecting to existing Serve app"
"""How Ray Serve's notice starts that `serve.run` logs when a Serve instance already runs."""


class _DropServeReconnectNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(SERVE_RECONNECT_NOTICE)


def _quiet_serve_reconnect_notice() -> None:
    """`serve.run` takes no HTTP options: the only way to set the port is `serve.start` first,
    and `serve.run` then finds that instance and logs 'Connecting to existing Serve app ... New
    http_options/controller_options will not be applied' (Ray 2.60), though it passes none and
    the port `serve.start` set is the one served. On every start it read as if --port were
    ignored. Drop that one message from the driver's "ray.serve" logger, where Serve logs it;
    every other message of that logger still prints."""
    logger = logging.getLogger("ray.serve")
    if not any(isinstance(f, _DropServeReconnectNotice) for f in logger.filters):
        logger.addFilter(_DropServeReconnectNotice())


def _first_request(url: str, api_key: str | None) -> dict[str, Any]:
    models = http_json(f"{url}/v1/models", token=api_key)
    body = {
        "model": models["data"][0]["id"],
        "max_tokens": 24,
        "temperature": 0,
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
    }
    return http_json(f"{url}/v1/chat/completions", body, api_key)


STOP_TIMEOUT_S = 30.0
"""How long a clean shutdown may take before `rap serve` exits anyway."""


def _stop() -> None:
    # A second interrupt while Ray shuts down (Ctrl-C twice, or Ray's own interrupt of the main
    # thread when a signal to the process group stopped its processes) would leave this half
    # done and print a traceback instead of "RAP Serve stopped": the watchdog below bounds the
    # stop instead. `_thread.interrupt_main` does nothing while SIGINT is ignored.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    import ray  # lazy: heavy (ray)
    from ray import serve  # lazy: heavy (ray)

    if not ray.is_initialized():  # stopped while Ray was still starting: nothing to shut down
        return

    # A signal sent to the whole process group (systemd's default, `timeout`, a terminal's
    # Ctrl-C) stops Ray's own processes too; Serve's shutdown then waits on a GCS that is gone
    # and never returns. Exit after STOP_TIMEOUT_S instead of hanging.
    def give_up() -> None:
        print(
            f"RAP Serve stopped: Ray did not shut down within {STOP_TIMEOUT_S:.0f} s "
            "(its processes were stopped from outside)",
            flush=True,
        )
        os._exit(0)

    timer = threading.Timer(STOP_TIMEOUT_S, give_up)
    timer.daemon = True
    timer.start()
    _quiet_serve_shutdown_report()
    serve.shutdown()
    ray.shutdown()
    timer.cancel()


def _quiet_serve_shutdown_report() -> None:
    """Serve's shutdown waits on its controller's `graceful_shutdown` until it kills that actor,
    and Ray then reports "Task ServeController.graceful_shutdown failed ... will be retried" on
    every stop (Ray 2.60): noise to a user of a clean stop. Drop that one message from the
    driver's error stream (`ray._private.worker.print_to_stdstream`); every other one prints."""
    import ray._private.worker as ray_worker  # lazy: heavy (ray)

    original = ray_worker.print_to_stdstream

    def filtered(data: dict[str, Any], ignore_prefix: bool) -> None:
        lines = data.get("lines", [])
        if any("ServeController.graceful_shutdown failed" in line for line in lines):
            return
        original(data, ignore_prefix)

    ray_worker.print_to_stdstream = filtered
