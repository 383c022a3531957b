"""`rap bench`'s harness: the systems, the budgets, and a trace played over HTTP.

Each system is a configuration of the same app (`system_config`), never a code path here:

    dense-high     dense, sized once for the high budget, ignores the shocks (follow_budget off)
    dense-low      dense, sized once for the lowest budget of the trace
    dense-elastic  dense (floor 1.0), follows the budget with its KV pool, preempts by recompute
    static         one pruned mask that fits the lowest budget, all the time (static_mask)
    rap            the controller with the shipped policy
    rap-heuristic  the controller with the heuristic planner `mem-greedy`

Budgets are scaled to the model (`Scale`): the lowest level of the trace (its deepest shock) is
the dense weights + one step + half the KV the running rows hold at a full batch of typical
requests — below dense weights + the running rows' KV, as the trace promises — and the high
budget is that over the lowest fraction. A run plays the trace against the app's real HTTP API
(`play`): requests stream through /v1/completions at their arrival times, budget steps go to
/admin/budget, and /admin/state is sampled every `sample_period_s` for the bytes the replica
measures from its tensors (weights + KV pool), its mask and its queue.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from rap.core import memory
from rap.core.constants import GIB
from rap.ops.traces import Trace

SYSTEMS = ("dense-high", "dense-low", "dense-elastic", "static", "rap", "rap-heuristic")
REPLICA = "replica-0"


@dataclass(frozen=True)
class Scale:
    """The trace's budget fractions in bytes for one model (module doc)."""

    high_bytes: int
    low_bytes: int
    weights_bytes: int
    running_kv_bytes: int

    @classmethod
    def of(cls, config: Any, dtype: str, trace: Trace, batch: int, step_tokens: int) -> Scale:
        weights = memory.weight_bytes(config, memory.dense_mask(config), dtype)
        step = memory.step_activation_bytes(config, step_tokens, batch, dtype)
        mean = statistics.mean(r.prompt_tokens + r.max_tokens for r in trace.requests)
        running = memory.kv_bytes(config, memory.dense_mask(config), batch, round(mean), dtype)
        low = weights + step + running // 2
        lowest = min(s.fraction for s in trace.budget)
        return cls(int(low / lowest), low, weights, running)


def system_config(name: str, scale: Scale, static_key: str, batch: int) -> dict[str, Any]:
    """The app configuration (`ServeAppConfig` fields) of one system."""
    high, low = scale.high_bytes / GIB, scale.low_bytes / GIB
    engine: dict[str, Any] = {"max_batch_size": batch, "grow_after_s": 2.0}
    app: dict[str, Any] = {"model": "smollm2", "num_threads": 2, "policy": None}
    budget = high
    if name in ("dense-high", "dense-low", "dense-elastic"):
        engine["min_kept_fraction"] = 1.0
        engine["follow_budget"] = name == "dense-elastic"
        budget = low if name == "dense-low" else high
    elif name == "static":
        engine.update(static_mask=static_key, follow_budget=False, min_kept_fraction=0.0)
        budget = low
    elif name == "rap":
        app["policy"] = "rap"  # the shipped RAP policy
    elif name == "rap-heuristic":
        app["planner"] = "surrogate-greedy"  # the best non-learned planner offline
    else:
        raise ValueError(f"unknown system {name!r}; expected one of {SYSTEMS}")
    replica = {"name": REPLICA, "budget_gib": budget, "num_cpus": 1}
    return {**app, "engine": engine, "replicas": [replica]}


@dataclass
class Record:
    """One request as the client saw it."""

    index: int
    sent_s: float
    prompt_tokens: int
    max_tokens: int
    status: int = 0
    first_token_s: float | None = None
    done_s: float | None = None
    tokens: int = 0
    mask_key: str | None = None
    predicted_delta_lnppl: float | None = None
    error: str | None = None


@dataclass
class Run:
    """What one system did on the trace: requests, samples, budget steps (wall seconds)."""

    system: str
    stretch: float
    records: list[Record] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    budget_steps: list[tuple[float, int, str]] = field(default_factory=list)


def _post(url: str, body: dict[str, Any], token: str | None, timeout: float = 30) -> Any:
    req = urllib.request.Request(url, json.dumps(body).encode(), method="POST")
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    return urllib.request.urlopen(req, timeout=timeout)


def stream_one(url: str, model: str, prompt: str, rec: Record, t0: float) -> Record:
    """One streamed completion, EOS ignored; times relative to `t0`."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": rec.max_tokens,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    try:
        with _post(f"{url}/v1/completions", body, None, timeout=600) as resp:
            rec.status = resp.status
            for raw in resp:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    rec.tokens += 1
                    if rec.first_token_s is None:
                        rec.first_token_s = time.monotonic() - t0
                if "rap" in chunk:
                    rec.mask_key = chunk["rap"].get("mask_key")
                    rec.predicted_delta_lnppl = chunk["rap"].get("predicted_delta_lnppl")
                if "error" in chunk:
                    rec.error = str(chunk["error"].get("message"))
        rec.done_s = time.monotonic() - t0
    except urllib.error.HTTPError as exc:
        rec.status, rec.error = exc.code, exc.read().decode()[:200]
    except OSError as exc:
        rec.status, rec.error = -1, f"{type(exc).__name__}: {exc}"
    return rec


def sample_state(url: str, token: str, t0: float) -> dict[str, Any] | None:
    try:
        req = urllib.request.Request(f"{url}/admin/state")
        req.add_header("Authorization", f"Bearer {token}")
        with urllib.request.urlopen(req, timeout=5) as resp:
            tel = json.loads(resp.read())["replicas"][REPLICA]
        if "error" in tel:  # the replica did not answer (restarting, stopped)
            return None
    except (OSError, KeyError, ValueError):
        return None
    return {
        "t": time.monotonic() - t0,
        "bytes": tel["weight_bytes"] + tel["kv_bytes_reserved"],
        "weight_bytes": tel["weight_bytes"],
        "kv_bytes": tel["kv_bytes_reserved"],
        "kept": (tel["attn_kept"] + tel["mlp_kept"]) / max(2 * tel["num_layers"], 1),
        "waiting": tel["queue"]["waiting"],
        "running": tel["queue"]["running"],
        "tokens_per_s": tel["tokens_per_s"],
        "preemptions": tel["preemptions"],
    }


def play(
    url: str,
    token: str,
    model: str,
    trace: Trace,
    prompts: list[str],
    scale: Scale,
    run: Run,
    duration_s: float | None = None,
    sample_period_s: float = 0.2,
    progress: Any = None,
) -> Run:
    """Play `trace` stretched by `run.stretch` (module doc); stops sending at `duration_s`."""
    t0 = time.monotonic()
    end = trace.duration * run.stretch if duration_s is None else duration_s
    stop = threading.Event()

    def sampler() -> None:
        while not stop.is_set():
            sample = sample_state(url, token, t0)
            if sample is not None:
                run.samples.append(sample)
            stop.wait(sample_period_s)

    def budgets() -> None:
        for step in trace.budget:
            at = step.t * run.stretch
            if at > end or stop.wait(max(0.0, at - (time.monotonic() - t0))):
                return
            gib = step.fraction * scale.high_bytes / GIB
            _post(f"{url}/admin/budget", {"replica": REPLICA, "gib": gib}, token).close()
            run.budget_steps.append((time.monotonic() - t0, int(gib * GIB), step.label))

    threads = [threading.Thread(target=f, daemon=True) for f in (sampler, budgets)]
    for th in threads:
        th.start()
    with ThreadPoolExecutor(max_workers=64) as pool:
        futures = []
        for i, r in enumerate(trace.requests):
            at = r.t * run.stretch
            if at > end:
                break
            time.sleep(max(0.0, at - (time.monotonic() - t0)))
            rec = Record(i, time.monotonic() - t0, r.prompt_tokens, r.max_tokens)
            futures.append(pool.submit(stream_one, url, model, prompts[i], rec, t0))
            if progress is not None:
                progress(1)
        run.records = [f.result() for f in futures]
    time.sleep(2 * sample_period_s)  # the last samples after the last request
    stop.set()
    for th in threads:
        th.join(timeout=30)
    return run


def capacity(url: str, model: str, trace: Trace, prompts: list[str], batch: int, n: int) -> float:
    """Requests per second the running app completes in a closed loop of `batch` clients,
    over the trace's first `n` requests (lengths as in the trace)."""
    t0 = time.monotonic()
    recs = [Record(i, 0.0, r.prompt_tokens, r.max_tokens) for i, r in enumerate(trace.requests)]
    with ThreadPoolExecutor(max_workers=batch) as pool:
        done = list(pool.map(lambda r: stream_one(url, model, prompts[r.index], r, t0), recs[:n]))
    ok = [r for r in done if r.status == 200 and r.error is None]
    return len(ok) / (time.monotonic() - t0)
