"""The engine's golden trace: one fixed run, step by step, written to a committed file.

    .venv/bin/python -m tests.serving.golden_trace --write   # a change that must alter it
    .venv/bin/python -m tests.serving.golden_trace           # compare a fresh run (1: differs)

A tiny llama (tests/tiny.py, seed 0, word-level tokenizer) serves six requests — greedy and
seeded sampling, a stop string, a slow reader, one that asks for the dense model — while the
script below sends the engine what an operator and a controller would, each at a fixed loop
turn: a budget drop that shrinks the mask and cuts the pool under running rows (compaction and a
preemption), an operator ceiling, its release with the memory back (a grow under running rows),
a cancellation. The engine runs in this thread (`tests.serving.engine_driver`: the real engine,
its loop body run one turn at a time, a grow's restore read awaited in the turn that starts it),
so every decision is the engine's and none depends on the machine's speed.

Each turn's line: the controls sent before it, the model's mask and pool, the tokens through
the forward, then every running row (its mask, tokens held, pages per layer), the rows waiting,
the rows preempted in that turn, the tokens each row got and the rows that ended (with why).
A change to the engine that alters this file must say why in its commit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from rap.core.masks import KeepMask
from rap.serving.engine import Engine
from rap.serving.outbox import Outbox
from rap.serving.rows import Request, Row
from tests.serving.engine_driver import CONFIG, SteppedEngine, add, turn
from tests.tiny import FnPlanner, save_tiny, save_tokenizer

GOLDEN = Path(__file__).parent / "golden" / "engine_trace.jsonl"
SLOW_READER_EVENTS = 3
"""The slow reader's outbox: its row sits out steps once this many events wait unread."""

SMALL = "a1,m0"
"""The planner's mask for any budget the dense model's full batch does not fit (keeps 75 %)."""
CEILING = "m2"
"""The operator's mask: under it the model runs SMALL without MLP 2 as well (62.5 %)."""

# turn → what is sent to the engine before that turn runs
SCRIPT: dict[int, list[tuple[Any, ...]]] = {
    0: [
        ("submit", Request([5, 6, 7, 8, 9], 24, ignore_eos=True)),
        ("submit", Request([10, 11, 12], 24, 0.8, 0.9, ["w46"], seed=1, ignore_eos=True)),
        ("submit", Request(list(range(13, 28)), 20, 1.3, seed=2, ignore_eos=True)),
    ],
    2: [("submit_slow", Request([30, 31], 16, ignore_eos=True))],
    16: [("budget", SMALL, 15)],
    17: [("submit", Request([40, 41, 42], 6, min_kept_fraction=1.0, ignore_eos=True))],
    19: [("ceiling", CEILING)],
    21: [("read_slow",)],
    24: [("ceiling", None), ("budget", "", 400)],
    25: [("submit", Request([50, 51], 12, 0.9, 0.95, seed=3, ignore_eos=True))],
    27: [("cancel", 3), ("read_slow",)],
    **{t: [("read_slow",)] for t in range(33, 60, 6)},
}
TURNS = 48


class Recorded(Outbox):
    """A slow reader's outbox that also keeps every event put (what the trace reads)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, engine: Engine, log: list) -> None:
        super().__init__(loop, SLOW_READER_EVENTS, on_put=engine._priced)
        self.log = log

    def __call__(self, event: dict[str, Any]) -> None:
        super().__call__(event)
        self.log.append(event)


class Trace:
    """The engine, its rows and the loop that plays the slow reader's client."""

    def __init__(self, folder: Path) -> None:
        import rap  # a heavy import: torch and transformers

        self.model = rap.load_model(str(folder), device="cpu")
        n = self.model.num_layers
        small = KeepMask.from_key(self.model.model_id, n, SMALL)
        planner = FnPlanner(lambda budget, batch, seq: small)
        self.engine = SteppedEngine(self.model, CONFIG, self.budget("", 400), planner)
        self.rows: dict[int, Row] = {}
        self.events: dict[int, list[dict[str, Any]]] = {}
        self.seen: dict[int, int] = {}
        self.loop = asyncio.new_event_loop()
        self.slow: Recorded | None = None

    def budget(self, key: str, pages: int) -> int:
        """Bytes of `key`'s weights, a pool of `pages` pages per kept layer and one step."""
        from rap.serving.sizing import Sizing

        mask = KeepMask.from_key(self.model.model_id, self.model.num_layers, key)
        return Sizing(self.model, CONFIG).bytes_with(mask, pages)

    def send(self, control: tuple[Any, ...]) -> str:
        """Apply one control; returns how the trace names it."""
        kind, *args = control
        eng = self.engine
        if kind in ("submit", "submit_slow"):
            (request,) = args
            log: list[dict[str, Any]] = []
            if kind == "submit":
                sink: Any = log.append
            else:
                sink = self.slow = Recorded(self.loop, eng, log)
            row = add(eng, request, sink)
            self.rows[row.id], self.events[row.id], self.seen[row.id] = row, log, 0
            slow = " (slow reader)" if kind == "submit_slow" else ""
            return f"submit {row.id}{slow}: {_describe(request)}"
        if kind == "budget":
            key, pages = args
            budget = self.budget(key, pages)
            eng.set_budget(budget)  # applied at the next turn's boundary (follow_budget is on)
            return f"set_budget {budget} (mask '{key}' with {pages} pages)"
        if kind == "ceiling":
            (key,) = args
            ceiling = None
            if key is not None:
                ceiling = KeepMask.from_key(self.model.model_id, self.model.num_layers, key)
            eng.set_ceiling(ceiling)
            return f"set_ceiling {key!r}"
        if kind == "cancel":
            (row_id,) = args
            eng.cancel(row_id)
            return f"cancel {row_id}"
        if kind == "read_slow":
            assert self.slow is not None
            read = self.loop.run_until_complete(_drain(self.slow))
            return f"the slow reader reads {read} events"
        raise ValueError(f"unknown control {kind!r}")

    def step(self, index: int) -> dict[str, Any]:
        """Send this turn's controls, run the turn, describe what it did."""
        eng, sched = self.engine, self.engine.scheduler
        controls = [self.send(c) for c in SCRIPT.get(index, [])]
        preempted_before = {i: r.preemptions for i, r in self.rows.items()}
        tokens_before = sched.stats.tokens
        turn(eng)
        line: dict[str, Any] = {
            "turn": index,
            "controls": controls,
            "mask": self.model.mask.key,
            "pool_pages": sched.pool.capacity,
            "forward_tokens": sched.stats.tokens - tokens_before,
            "running": [_row(r) for r in sched.running],
            "waiting": [r.id for r in sched.waiting],
            "preempted": [i for i, r in self.rows.items() if r.preemptions > preempted_before[i]],
            "tokens": {},
            "ended": {},
        }
        for row_id, row in self.rows.items():
            new = row.generated[self.seen[row_id] :]
            self.seen[row_id] = len(row.generated)
            if new:
                line["tokens"][str(row_id)] = new
            for event in self.events[row_id]:
                if event["type"] in ("done", "error") and not event.get("_traced"):
                    event["_traced"] = True
                    line["ended"][str(row_id)] = _ending(event)
        return line


def _describe(r: Request) -> str:
    parts = [f"prompt {r.prompt_ids}", f"max_tokens {r.max_tokens}"]
    if r.temperature > 0:
        parts.append(f"temperature {r.temperature} top_p {r.top_p} seed {r.seed}")
    if r.stop:
        parts.append(f"stop {r.stop}")
    if r.min_kept_fraction:
        parts.append(f"min_kept_fraction {r.min_kept_fraction}")
    return ", ".join(parts)


def _row(row: Row) -> dict[str, Any]:
    pages = {str(layer): list(rp.pages) for layer, rp in sorted(row.pages.items())}
    mask = row.mask.key if row.mask is not None else None
    return {"id": row.id, "mask": mask, "held": row.held, "pages": pages}


def _ending(event: dict[str, Any]) -> dict[str, Any]:
    if event["type"] == "error":
        return {"error": event["status"], "code": event.get("code")}
    keep = ("finish_reason", "completion_tokens", "fingerprint", "mask_changes")
    return {k: event[k] for k in keep if k in event}


async def _drain(box: Outbox) -> int:
    """Read every event the slow reader's outbox holds."""
    n = box.backlog
    for _ in range(n):
        await box.get()
    return n


def trace(folder: Path) -> list[dict[str, Any]]:
    """The whole run on the tiny model saved in `folder` (tests/tiny.py's llama, seed 0)."""
    run = Trace(folder)
    lines = [run.step(i) for i in range(TURNS)]
    assert run.engine.scheduler.idle, "the script's requests did not all end in its turns"
    run.loop.close()
    return lines


def fresh() -> list[dict[str, Any]]:
    """The trace on a newly saved tiny model."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_tiny("llama", Path(tmp), seed=0)
        save_tokenizer(folder)
        return trace(folder)


def dump(lines: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(line, sort_keys=True) + "\n" for line in lines)


def load() -> list[dict[str, Any]]:
    return [json.loads(line) for line in GOLDEN.read_text().splitlines()]


def first_difference(want: list[dict[str, Any]], have: list[dict[str, Any]]) -> str | None:
    """Where a fresh trace leaves the golden one, said so that a reader sees what moved."""
    for a, b in zip(want, have, strict=False):
        if a != b:
            keys = sorted(k for k in {*a, *b} if a.get(k) != b.get(k))
            said = "; ".join(
                f"{k}: golden {_short(a.get(k))}, now {_short(b.get(k))}" for k in keys
            )
            return f"turn {a.get('turn')}: {said}"
    if len(want) != len(have):
        return f"{len(want)} turns in the golden trace, {len(have)} now"
    return None


def _short(value: Any, chars: int = 240) -> str:
    text = repr(value)
    return text if len(text) <= chars else text[:chars] + " ..."


def main() -> int:
    import torch  # a heavy import

    torch.set_num_threads(2)  # as the tests run (tests/conftest.py)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"rewrite {GOLDEN}")
    args = parser.parse_args()
    lines = fresh()
    if args.write:
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(dump(lines))
        print(f"{len(lines)} turns written to {GOLDEN}")
        return 0
    diff = first_difference(load(), lines)
    print(diff or f"{len(lines)} turns: the same as {GOLDEN}")
    return 1 if diff else 0


if __name__ == "__main__":
    sys.exit(main())
