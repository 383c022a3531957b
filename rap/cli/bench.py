"""`rap bench`: serving under memory shocks, RAP against what users run today.

    rap bench --trace shock [--duration S] [--systems dense-high,rap,...] --out DIR

Parse → build (trace, budgets scaled to the model, prompts, the systems' app configs) → run
(one local Ray; per system the app is deployed with its configuration, dense-high first, whose
closed-loop capacity sets the arrival rate λ = capacity_share × capacity; the trace is played
over HTTP) → report (DIR/bench.json.gz, DIR/bench.md, DIR/timeline-<system>.png).
`rap.ops.bench` holds the harness, `rap.ops.bench_report` the figures.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import os
import secrets
import time
import urllib.request
from pathlib import Path
from typing import Any

from rap.cli.common import parse_list
from rap.core.constants import STEP_TOKENS
from rap.core.errors import RapError
from rap.core.loading import load_config, resolve
from rap.importance.calibration import PERPLEXITY_SOURCE, encode, text_of
from rap.ops import bench, bench_report
from rap.ops.bench import SYSTEMS, Scale
from rap.ops.ray_env import patient_serve_env
from rap.ops.traces import load_trace

PORT = 8765
DOC = "bench.json.gz"
"""Every request, sample and budget step: gzipped compact JSON (a full run's is ~1.5 MB raw)."""


def read_doc(path: Path) -> dict[str, Any]:
    return dict(json.loads(gzip.decompress(path.read_bytes())))


def write_doc(path: Path, doc: dict[str, Any]) -> None:
    raw = json.dumps(doc, separators=(",", ":")).encode()
    path.write_bytes(gzip.compress(raw, compresslevel=9, mtime=0))


def add_commands(sub: Any) -> None:
    p = sub.add_parser("bench", help="serving under memory shocks: RAP against the baselines")
    p.add_argument("--trace", default="shock", help="a committed trace name or a trace file")
    p.add_argument("--systems", default=",".join(SYSTEMS), help=f"some of {','.join(SYSTEMS)}")
    p.add_argument("--duration", type=float, help="stop sending after S seconds (default: all)")
    p.add_argument("--out", required=True, type=Path, help="folder for bench.json.gz/.md/.png")
    p.add_argument("--batch", type=int, default=8, help="rows a replica runs at once")
    p.add_argument("--capacity-requests", type=int, default=16, help="for dense-high's capacity")
    p.add_argument(
        "--rate",
        type=float,
        help="arrivals per second, given instead of measured (a smoke run; the trace's own "
        "rate is capacity_share × dense-high's measured capacity)",
    )
    p.add_argument("--port", type=int, default=PORT)
    p.add_argument(
        "--no-quality", action="store_true", help="skip measuring the served masks' quality"
    )
    p.set_defaults(func=cmd_bench)
    r = sub.add_parser("bench-quality", help="measure the quality of the masks a bench served")
    r.add_argument("folder", type=Path, help="a `rap bench --out` folder (bench.json.gz)")
    r.set_defaults(func=cmd_bench_quality)


def cmd_bench(args: argparse.Namespace) -> int:
    from tqdm import tqdm  # lazy: heavy (tqdm)

    systems = parse_list(args.systems, "--systems", str)
    unknown = [s for s in systems if s not in bench.SYSTEMS]
    if unknown:
        raise RapError(f"unknown systems {unknown}", expected=f"some of {list(bench.SYSTEMS)}")
    trace = load_trace(args.trace)
    scale, static_key, prompts, model = _build(trace, args.batch)
    args.out.mkdir(parents=True, exist_ok=True)
    url = f"http://127.0.0.1:{args.port}"
    token = secrets.token_urlsafe(16)
    os.environ["RAP_ADMIN_TOKEN"] = token  # inherited by Ray's workers
    runs, started = [], time.monotonic()
    _start_ray(args.port)
    try:
        cap = None
        if args.rate is None:
            _deploy(bench.system_config("dense-high", scale, static_key, args.batch), url)
            cap = bench.capacity(url, model, trace, prompts, args.batch, args.capacity_requests)
            print(f"dense-high sustains {cap:.3f} requests/s", flush=True)
        rate = args.rate if args.rate is not None else trace.capacity_share * (cap or 0.0)
        stretch = 1.0 / rate
        print(f"arrivals at λ = {rate:.3f}/s: the trace lasts {trace.duration * stretch:.0f} s")
        end = trace.duration * stretch if args.duration is None else args.duration
        sent = sum(1 for r in trace.requests if r.t * stretch <= end)
        with tqdm(total=sent * len(systems), desc="rap bench", unit="req") as bar:
            for name in systems:
                bar.set_postfix_str(name)
                _deploy(bench.system_config(name, scale, static_key, args.batch), url)
                run = bench.Run(name, stretch)
                bench.play(
                    url, token, model, trace, prompts, scale, run, args.duration,
                    progress=bar.update,
                )  # fmt: skip
                runs.append(run)
    finally:
        _stop_ray()
    rows = [bench_report.figures(r, trace, scale.high_bytes) for r in runs]
    if not args.no_quality:
        bench_report.add_measured(rows, measured_lnppl(rows))
    for r in runs:
        bench_report.timeline(r, scale.high_bytes, args.out / f"timeline-{r.system}.png")
    _write(args.out, trace, scale, static_key, cap, stretch, rows, runs, time.monotonic() - started)
    print(bench_report.markdown(rows))
    return 0


def measured_lnppl(rows: list[dict[str, Any]]) -> dict[str, float]:
    """ln perplexity of the dense model and of every mask the rows served, on the `served`
    part of the perplexity text (`rap.importance.quality`: 1,024-token windows; cached)."""
    from tqdm import tqdm  # lazy: heavy (tqdm)

    from rap.core.loading import load_model  # lazy: heavy (torch, transformers)
    from rap.importance.quality import Meter  # lazy: heavy (torch, transformers)

    keys = sorted({"", *(k for r in rows for k in r["tokens_by_mask"] if k != "?")})
    meter = Meter(load_model("smollm2", dtype="float32"), "served")
    return {k: meter.lnppl(k) for k in tqdm(keys, desc="served masks' quality", unit="mask")}


def cmd_bench_quality(args: argparse.Namespace) -> int:
    """Measure the served masks of an existing run and rewrite its bench.json.gz and bench.md."""
    path = args.folder / DOC
    if not path.is_file():
        raise RapError(f"{path} does not exist", expected="a folder written by `rap bench --out`")
    doc = read_doc(path)
    bench_report.add_measured(doc["systems"], measured_lnppl(doc["systems"]))
    write_doc(path, doc)
    md = args.folder / "bench.md"
    head = md.read_text().split("\n\n", 1)[0] if md.is_file() else ""
    md.write_text(head + "\n\n" + bench_report.markdown(doc["systems"]) + "\n")
    print(bench_report.markdown(doc["systems"]))
    return 0


def _build(trace: Any, batch: int) -> tuple[Any, str, list[str], str]:
    """Budgets, the static mask, prompt texts of the trace's lengths, the served name."""
    from rap.planning.registry import make_planner  # lazy: heavy (torch)

    config, model_id = load_config("smollm2")
    scale = Scale.of(config, "float32", trace, batch, STEP_TOKENS)
    planner = make_planner("mem-greedy", config, model_id, "float32")
    seq = max(r.prompt_tokens + r.max_tokens for r in trace.requests)
    static = planner.plan(scale.low_bytes, batch, seq, min(seq, STEP_TOKENS))  # or BudgetError
    from transformers import AutoTokenizer  # lazy: heavy (transformers)

    tokenizer = AutoTokenizer.from_pretrained(str(resolve("smollm2")[0]))
    ids = encode(tokenizer, text_of(PERPLEXITY_SOURCE)[:400_000], config.vocab_size)
    prompts: list[str] = []
    at = 0
    for r in trace.requests:  # consecutive windows of the perplexity text, each its length
        if at + r.prompt_tokens > len(ids):
            at = 0
        prompts.append(str(tokenizer.decode(ids[at : at + r.prompt_tokens])))
        at += r.prompt_tokens
    return scale, static.key, prompts, model_id


def _start_ray(port: int) -> None:
    import ray  # lazy: heavy (ray)
    from ray import serve  # lazy: heavy (ray)

    patient_serve_env()
    ray.init(
        address="local",
        include_dashboard=False,
        logging_level=logging.WARNING,
        log_to_driver=False,  # the replicas' request logs would bury the progress bar
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
    except BaseException:  # no cluster left behind for the next ray.init in this process
        ray.shutdown()
        raise


def _deploy(app_config: dict[str, Any], url: str, timeout_s: float = 300) -> None:
    """Deploy (or replace) the app with `app_config` and wait for /health."""
    from ray import serve  # lazy: heavy (ray)

    from deployments.app import build_app  # lazy: heavy (torch, transformers, ray)
    from rap.serving.config import ServeAppConfig  # lazy: heavy (torch, transformers)

    cfg = ServeAppConfig.model_validate(app_config)
    serve.run(build_app(cfg.model_dump(mode="json")), name="rap", route_prefix="/")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RapError(f"the app did not become healthy within {timeout_s:.0f} s")


def _stop_ray() -> None:
    import ray  # lazy: heavy (ray)
    from ray import serve  # lazy: heavy (ray)

    if ray.is_initialized():
        serve.shutdown()
        ray.shutdown()


def _write(out: Path, trace: Any, scale: Any, static_key: str, cap: float | None, stretch: float,
           rows: list[dict[str, Any]], runs: list[Any], seconds: float) -> None:  # fmt: skip
    doc = {
        "trace": {"name": trace.name, "sha256": trace.sha256, "slo": trace.slo.model_dump()},
        "scale": vars(scale),
        "static_mask": static_key,
        "dense_high_capacity_rps": cap,
        "rate_given": cap is None,
        "stretch": stretch,
        "seconds": seconds,
        "systems": rows,
        "runs": [
            {
                "system": r.system,
                "records": [vars(x) for x in r.records],
                "samples": r.samples,
                "budget_steps": r.budget_steps,
            }
            for r in runs
        ],
    }
    write_doc(out / DOC, doc)
    head = f"Trace `{trace.name}` (sha256 {trace.sha256[:16]}…), λ = {1 / stretch:.3f} req/s\n\n"
    (out / "bench.md").write_text(head + bench_report.markdown(rows) + "\n")
