"""The GPU run's figures as Markdown tables (for docs/results.md and the issue note).

python bench/gpu/summarize.py bench/results/gpu/gpu.json   (or gpu-replicas.json[.gz])
"""

from __future__ import annotations

import gzip
import json
import statistics
import sys
from pathlib import Path
from typing import Any

GIB = 2**30


def num(value: float | None, fmt: str, scale: float = 1.0) -> str:
    """A figure, or n/a where the run measured none (a dry run: no CUDA)."""
    return "n/a" if value is None else format(value / scale, fmt)


def memory_table(part: dict[str, Any]) -> list[str]:
    lines = [
        "| path | mask | B | tokens | predicted GiB | measured GiB | error |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in part["rows"]:
        tokens = r.get("seq") or r.get("prompt")
        lines.append(
            f"| {r['path']} | {r['mask']} | {r['batch']} | {tokens} "
            f"| {num(r['predicted'], '.2f', GIB)} "
            f"| {num(r['measured'], '.2f', GIB)} | {num(r['error'], '+.1%')} |"
        )
    for path in ("engine", "generate"):
        errs = [
            abs(r["error"]) for r in part["rows"] if r["path"] == path and r["error"] is not None
        ]
        if errs:
            lines.append(
                f"\n{path}: mean |error| {statistics.mean(errs):.1%}, worst {max(errs):.1%}, "
                f"{sum(e <= 0.05 for e in errs)}/{len(errs)} within 5 %"
            )
    return lines


def blocks_table(part: dict[str, Any]) -> list[str]:
    bw = part["bandwidth"]
    lines = [
        f"pinned host→device {num(bw['h2d_pinned_bytes_per_s'], '.1f', 1e9)} GB/s, "
        f"device-to-device {num(bw['d2d_bytes_per_s'], '.0f', 1e9)} GB/s (2 · bytes / time)\n",
        "| block | predicted MiB | freed (allocator) MiB | freed (NVML) MiB | drop ms | restore ms "
        "| restore GB/s | share of H2D | bit-identical |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in part["rows"]:
        lines.append(
            f"| {r['kind']} L{r['layer']} | {r['predicted_bytes'] / 2**20:.1f} "
            f"| {num(r['freed_allocated_bytes'], '.1f', 2**20)} "
            f"| {num(r['freed_nvml_bytes'], '.1f', 2**20)} "
            f"| {1e3 * r['drop_s']:.1f} | {1e3 * r['restore_s']:.1f} "
            f"| {r['restore_bytes_per_s'] / 1e9:.1f} | {num(r['restore_share_of_h2d'], '.0%')} "
            f"| {r['bit_identical']} |"
        )
    return lines


def decode_table(part: dict[str, Any]) -> list[str]:
    lines = [
        f"device bandwidth (device-to-device copy, 2 · bytes / time): "
        f"{num(part['device_bytes_per_s'], '.2f', 1e12)} TB/s\n",
        "| mask (weight share) | B | context | graphs ms/step | graphs tok/s | graphs roofline "
        "| engine ms/step | engine tok/s | engine roofline "
        "| generate() ms/step | generate() tok/s | generate() roofline |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows: dict[tuple[str, int, int], dict[str, Any]] = {}
    for r in part["rows"]:
        rows.setdefault((r["mask"], r["batch"], r["context"]), {})[r["system"]] = r
    for (mask, batch, context), by in rows.items():
        cells = []
        for system in ("engine-graphs", "engine", "generate"):
            r = by.get(system)
            cells += (
                [
                    f"{r['ms_per_step']:.2f}",
                    f"{r['tokens_per_s']:.0f}",
                    num(r["roofline_share"], ".0%"),
                ]
                if r and "ms_per_step" in r
                else ["–", "–", "–"]
            )
        share = next(iter(by.values()))["weight_share"]
        lines.append(f"| {mask} ({share:.2f}) | {batch} | {context} | " + " | ".join(cells) + " |")
    return lines


def replicas_table(part: dict[str, Any]) -> list[str]:
    """The replicas part: each co-tenant step's reaction, bytes over share, accounting."""
    dev, summ = part["device"], part["summary"]
    sim = " (simulated: a dry run)" if dev.get("simulated") else ""
    lines = [
        f"device {num(dev['total_bytes'], '.1f', GIB)} GiB{sim}, co-tenant steps of "
        f"{num(dev['step_bytes'], '.2f', GIB)} GiB, margin {num(dev['margin_bytes'], '.2f', GIB)}"
        f" GiB; app up in {part.get('deploy_s', 0):.0f} s; requests {part.get('requests')}\n",
        "| co-tenant | GiB held | NVML free before GiB | budgets moved s | replicas fit s "
        "| NVML free ≥ margin s |",
        "|---|---|---|---|---|---|",
    ]
    for r in summ["reactions"]:
        lines.append(
            f"| {r['event']} | {num(r['cotenant_bytes'], '.1f', GIB)} "
            f"| {num(r.get('nvml_free_before'), '.2f', GIB)} | {num(r['budget_s'], '.2f')} "
            f"| {num(r['fit_s'], '.2f')} | {num(r['nvml_free_s'], '.2f')} |"
        )
    lines += [
        "",
        "| replica | samples | over share | max over MiB | GiB·s over | max peak over MiB |",
        "|---|---|---|---|---|---|",
    ]
    for name, o in summ["over_share"].items():
        lines.append(
            f"| {name} | {o['samples']} | {o['samples_over']} | {o['max_over_bytes'] / 2**20:.1f} "
            f"| {o['bytes_s_over'] / GIB:.3f} | {num(o['max_peak_over_bytes'], '.1f', 2**20)} |"
        )
    acc = summ["accounting"]
    rel, gap = acc["allocated_vs_predicted"], acc["nvml_unaccounted_bytes"]
    lines.append(
        f"\nallocated vs predicted (Σ replicas): median "
        f"{num(rel and rel['median'], '+.1%')}, range {num(rel and rel['min'], '+.1%')} .. "
        f"{num(rel and rel['max'], '+.1%')}; NVML used − (Σ reserved + co-tenant): median "
        f"{num(gap and gap['median'], '.2f', GIB)} GiB"
    )
    return lines


def main() -> int:
    path = Path(sys.argv[1])
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    report = json.loads(raw)
    env = report["env"]
    print(
        f"{env.get('device')}, driver {env.get('driver')}, torch {env['torch']} "
        f"(CUDA {env['cuda_runtime']}), transformers {env['transformers']}, commit "
        f"{str(env['commit'])[:7]}\n"
    )
    tables = {
        "memory": memory_table,
        "blocks": blocks_table,
        "decode": decode_table,
        "replicas": replicas_table,
    }
    for name, part in report["parts"].items():
        print(f"### {name} ({part['status']}, {part.get('seconds', 0):.0f} s)\n")
        if name in tables and part.get("rows"):
            print("\n".join(tables[name](part)))
        elif name == "scan" and part["status"] == "done":
            c = part["compare"]
            print(
                f"one-shot scan: GPU {part['gpu']['seconds']:.1f} s ({part['gpu']['device']}) vs "
                f"CPU {part['cpu']['seconds']:.1f} s ({part['cpu']['threads']} threads): "
                f"{part['speedup']:.0f}×; Spearman ρ ranks {c['spearman_ranks']:.3f}, scores "
                f"{c['spearman_scores']:.3f}, first 10 in common {c['first_10_in_common']}"
            )
        if part.get("error"):
            print("error:\n```\n" + part["error"][-1500:] + "\n```")
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
