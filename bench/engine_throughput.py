"""Engine v2 against transformers' continuous batching and the static-batch core it replaced.

Usage: .venv/bin/python bench/engine_throughput.py [--repeats 3] [--out F.json]
       .venv/bin/python bench/engine_throughput.py --make-prompts   (rewrites the prompt file)

The same committed prompts (`bench/data/engine_prompts.json`: 32 prompts of 32-256 tokens of
the Wikipedia perplexity text, output lengths log-normal with median ~45, seed 0) through, on
the default model in float32 with 2 torch threads, EOS ignored (equal work everywhere):

  v2        `rap.serving.scheduler.Scheduler`, dense, 8 rows at once, 256 tokens a step, a pool
            that holds every request (the engine under serving, without Ray)
  hf-cb     transformers' continuous batching (`init_continuous_batching`, per-request
            max_new_tokens, the same 8 rows and 256-token steps where it has the settings)
  old-engine  the static-batch engine v2 replaced, run as it served (`Engine.submit`, batches of
            8 gathered in its 50 ms window, each run to its longest row) from a git worktree of
            the last commit that has it (`OLD_ENGINE_COMMIT`), in a subprocess
            (`bench/old_engine_driver.py`); the model load is outside the timings
  static-8  `generate()` in static batches of 8 (the old engine's core; offline only)

Offline: all prompts at once, useful tokens/s. Online (v2 and old-engine): Poisson arrivals at
each rate of `--rates`; time to first token and per output token, p50/p99, and the highest rate
whose TTFT p99 stays under `--ttft-slo-s`. Each system `--repeats` times, interleaved; medians.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rap.core.loading import load_model
from rap.serving.kv_pages import PagePool
from rap.serving.scheduler import Request, Scheduler, SchedulerConfig

PROMPTS = Path(__file__).parent / "data" / "engine_prompts.json"
OLD_ENGINE_COMMIT = "0bb08d7e765302fedf3db86b990eae2c0062edf7"  # its parent deleted the engine
OLD_ENGINE_TREE = Path("/tmp/rap-old-engine")


def make_prompts(model: Any) -> None:
    from rap.importance.calibration import PERPLEXITY_SOURCE, encode, text_of

    ids = encode(model.tokenizer, text_of(PERPLEXITY_SOURCE), model.dims.vocab)
    rng = random.Random(0)
    rows = []
    for _ in range(32):
        n, start = rng.randint(32, 256), rng.randrange(0, len(ids) - 300)
        out = min(max(int(rng.lognormvariate(np.log(45), 0.6)), 4), 200)
        rows.append({"prompt_ids": ids[start : start + n], "max_tokens": out})
    PROMPTS.parent.mkdir(exist_ok=True)
    PROMPTS.write_text(json.dumps({"source": PERPLEXITY_SOURCE, "seed": 0, "rows": rows}) + "\n")


def scheduler(model: Any) -> Scheduler:
    config = SchedulerConfig(max_running=8, max_step_tokens=256, page_tokens=16, max_wait_s=600)
    d, kept = model.dims, [i for i, k in enumerate(model.mask.attn) if k]
    pool = PagePool(kept, 32 * 30, 16, d.kv_heads, d.head_dim, model.dtype)
    return Scheduler(model, pool, config)


def offline_v2(model: Any, rows: list[dict]) -> float:
    sched = scheduler(model)
    done: list[dict[str, Any]] = []
    start = time.perf_counter()
    for r in rows:
        sched.add(Request(r["prompt_ids"], r["max_tokens"], ignore_eos=True), done.append)
    while not sched.idle:
        sched.step()
    tokens = sum(e.get("completion_tokens", 0) for e in done if e["type"] == "done")
    return tokens / (time.perf_counter() - start)


def offline_static(model: Any, rows: list[dict]) -> float:
    start, tokens = time.perf_counter(), 0
    for i in range(0, len(rows), 8):
        group = rows[i : i + 8]
        gen = model.generate_ids(
            [r["prompt_ids"] for r in group], max(r["max_tokens"] for r in group), stop_at_eos=False
        )
        tokens += sum(
            min(len(ids), r["max_tokens"]) for ids, r in zip(gen.token_ids, group, strict=True)
        )
    return tokens / (time.perf_counter() - start)


def offline_hf_cb(model: Any, rows: list[dict]) -> float:
    from transformers import GenerationConfig

    gen = GenerationConfig(
        max_new_tokens=256, do_sample=False, eos_token_id=None, pad_token_id=model.pad_id()
    )
    manager = model.hf.init_continuous_batching(generation_config=gen)
    manager.start()
    start = time.perf_counter()
    for i, r in enumerate(rows):
        manager.add_request(r["prompt_ids"], request_id=f"r{i}", max_new_tokens=r["max_tokens"])
    tokens, seen = 0, 0
    while seen < len(rows):
        out = manager.get_result(timeout=60)
        if out is None:
            raise RuntimeError("transformers' continuous batching stopped answering")
        if out.is_finished():
            seen += 1
            tokens += len(out.generated_tokens)
    rate = tokens / (time.perf_counter() - start)
    manager.stop(block=True)
    return rate


def old_engine(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The jobs run by `old_engine_driver.py` with `rap` from the old commit's worktree."""
    repo = Path(__file__).resolve().parent.parent
    if not (OLD_ENGINE_TREE / ".git").exists():
        subprocess.run(
            [
                "git",
                "-C",
                str(repo),
                "worktree",
                "add",
                "--detach",
                "-f",
                str(OLD_ENGINE_TREE),
                OLD_ENGINE_COMMIT,
            ],
            check=True,
            capture_output=True,
        )
    out = subprocess.run(
        [sys.executable, str(repo / "bench" / "old_engine_driver.py")],
        input=json.dumps(jobs),
        capture_output=True,
        text=True,
        check=False,
        env={"PYTHONPATH": str(OLD_ENGINE_TREE), "PATH": "/usr/bin:/bin", "HOME": str(Path.home())},
    )
    if out.returncode != 0:
        raise RuntimeError(f"the old engine failed:\n{out.stderr[-3000:]}")
    results: list[dict[str, Any]] = json.loads(out.stdout)
    return results


def offline_old(_: Any, rows: list[dict]) -> float:
    rate: float = old_engine([{"mode": "offline", "rows": rows}])[0]["tokens_per_s"]
    return rate


def online_old(_: Any, rows: list[dict], rate: float, seed: int) -> dict[str, float]:
    job = {"mode": "online", "rows": rows, "rate": rate, "seed": seed}
    return _latencies(old_engine([job])[0]["marks"])


def online_v2(model: Any, rows: list[dict], rate: float, seed: int) -> dict[str, float]:
    sched = scheduler(model)
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            if sched.idle:
                time.sleep(0.002)
            else:
                sched.step()

    worker = threading.Thread(target=loop, daemon=True)
    worker.start()
    rng = random.Random(seed)
    marks: list[dict[str, float]] = []
    for r in rows:
        time.sleep(rng.expovariate(rate))
        mark = {"sent": time.perf_counter()}
        marks.append(mark)

        def sink(event: dict, mark: dict = mark) -> None:
            now = time.perf_counter()
            if event["type"] == "token" and "first" not in mark:
                mark["first"] = now
            if event["type"] == "done":
                mark["end"], mark["n"] = now, event["completion_tokens"]

        sched.add(Request(r["prompt_ids"], r["max_tokens"], ignore_eos=True), sink)
    while any("end" not in m for m in marks):
        time.sleep(0.01)
    stop.set()
    return _latencies(marks)


def _latencies(marks: list[dict[str, float]]) -> dict[str, float]:
    ttft = [m["first"] - m["sent"] for m in marks]
    tpot = [(m["end"] - m["first"]) / max(m["n"] - 1, 1) for m in marks]
    return {
        "ttft_p50_s": float(np.percentile(ttft, 50)),
        "ttft_p99_s": float(np.percentile(ttft, 99)),
        "tpot_p50_s": float(np.percentile(tpot, 50)),
        "tpot_p99_s": float(np.percentile(tpot, 99)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rates", default="0.25,0.5,1,2", help="arrivals per second (online)")
    parser.add_argument("--online-requests", type=int, default=16)
    parser.add_argument("--ttft-slo-s", type=float, default=5.0)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--make-prompts", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    model = load_model("smollm2", dtype="float32", device="cpu")
    if args.make_prompts:
        make_prompts(model)
        print(f"wrote {PROMPTS}")
        return
    rows = json.loads(PROMPTS.read_text())["rows"]
    offline_v2(model, rows[:2])  # warm-up
    systems = {
        "v2": offline_v2,
        "hf-cb": offline_hf_cb,
        "old-engine": offline_old,
        "static-8": offline_static,
    }
    offline: dict[str, list[float]] = {name: [] for name in systems}
    for rep in range(args.repeats):
        for name, run in systems.items():
            offline[name].append(run(model, rows))
            print(f"offline {name} run {rep + 1}: {offline[name][-1]:.1f} tokens/s", flush=True)
    result: dict[str, Any] = {
        "offline_tokens_per_s": {k: statistics.median(v) for k, v in offline.items()},
        "offline_runs": offline,
        "online": {},
    }
    online_rows = rows[: args.online_requests]
    for rate in [float(x) for x in args.rates.split(",")]:
        runs: dict[str, list[dict[str, float]]] = {"v2": [], "old-engine": []}
        for seed in range(args.repeats):  # interleaved
            runs["v2"].append(online_v2(model, online_rows, rate, seed))
            runs["old-engine"].append(online_old(model, online_rows, rate, seed))
        for name, by_seed in runs.items():
            med = {k: statistics.median(r[k] for r in by_seed) for k in by_seed[0]}
            result["online"].setdefault(name, {})[str(rate)] = med
            print(
                f"online {name} at {rate}/s: TTFT p50 {med['ttft_p50_s']:.2f} s, p99 "
                f"{med['ttft_p99_s']:.2f} s; TPOT p50 {med['tpot_p50_s'] * 1e3:.0f} ms",
                flush=True,
            )
    result["sustained_rate"] = {
        name: max(
            (float(r) for r, m in by_rate.items() if m["ttft_p99_s"] <= args.ttft_slo_s),
            default=0.0,
        )
        for name, by_rate in result["online"].items()
    }
    result["settings"] = vars(args) | {"out": str(args.out) if args.out else None}
    off = result["offline_tokens_per_s"]
    print(
        f"offline: v2 {off['v2']:.1f}, hf-cb {off['hf-cb']:.1f}, old-engine {off['old-engine']:.1f}"
        f", static-8 {off['static-8']:.1f} tokens/s (v2 / hf-cb = {off['v2'] / off['hf-cb']:.2f})"
    )
    print(f"sustained rate with TTFT p99 ≤ {args.ttft_slo_s} s: {result['sustained_rate']}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
