"""The replicas part's figures, from its samples and the co-tenant's events (pure Python, so
that a cut-off run's JSON can be re-analysed and the figures tested without a GPU).

A sample: `{"t": wall s, "cotenant_bytes": n, "nvml": {"used", "free", "per_pid"} or None,
"replicas": {name: {"budget", "held", "peak", "allocated", "reserved", "predicted", ...}}}`,
where `held` is the replica's bytes: torch's `memory_allocated` on a GPU, else the telemetry's
weights + KV pool. An event: `{"t": wall s when done, "event": "alloc"|"free", "ok", "held"}`.
"""

from __future__ import annotations

import statistics
from typing import Any


def over_share(samples: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per replica: the most bytes held over its share (its budget), the bytes·s over it
    (each sample's excess held until the next sample), the same for the allocator's peak
    between snapshots, and how many samples were over."""
    out: dict[str, dict[str, Any]] = {}
    for i, s in enumerate(samples):
        dt = samples[i + 1]["t"] - s["t"] if i + 1 < len(samples) else 0.0
        for name, r in s["replicas"].items():
            o = out.setdefault(
                name,
                {
                    "max_over_bytes": 0,
                    "bytes_s_over": 0.0,
                    "samples": 0,
                    "samples_over": 0,
                    "max_peak_over_bytes": None,
                },
            )
            over = r["held"] - r["budget"]
            o["samples"] += 1
            o["max_over_bytes"] = max(o["max_over_bytes"], over)
            if over > 0:
                o["samples_over"] += 1
                o["bytes_s_over"] += over * dt
            if r.get("peak") is not None:
                peak_over = r["peak"] - r["budget"]
                o["max_peak_over_bytes"] = max(o["max_peak_over_bytes"] or peak_over, peak_over)
    return out


def _first(samples: list[dict[str, Any]], since: float, until: float, ok: Any) -> float | None:
    """Seconds from `since` to the first sample in [since, until) for which `ok` holds."""
    for s in samples:
        if since <= s["t"] < until and ok(s):
            return float(s["t"] - since)
    return None


def reactions(
    samples: list[dict[str, Any]], events: list[dict[str, Any]], margin_bytes: int | None
) -> list[dict[str, Any]]:
    """For each co-tenant step that happened: seconds from it to (1) every replica's budget
    having moved the right way (down after an allocation, up after the free), (2) every
    replica holding no more than that new budget, and (3) on a GPU, NVML free back at the
    margin or above (the reserve a next step allocates into). None: not within the window
    before the next step (or the end of the run); a step that fit beside the margin (NVML
    free before it, minus the step, still at least the margin) needs no budget to move."""
    done = [e for e in events if e["event"] in ("alloc", "free") and e.get("ok", True)]
    out = []
    for k, e in enumerate(done):
        until = done[k + 1]["t"] if k + 1 < len(done) else float("inf")
        before = [s for s in samples if s["t"] < e["t"] and s["replicas"]]
        if not before:
            continue
        old = {n: r["budget"] for n, r in before[-1]["replicas"].items()}
        down = e["event"] == "alloc"

        def moved(s: dict[str, Any], old: dict[str, int] = old, down: bool = down) -> bool:
            rs = s["replicas"]
            return bool(rs) and all(
                (rs[n]["budget"] < b) if down else (rs[n]["budget"] > b)
                for n, b in old.items()
                if n in rs
            )

        to_budget = _first(samples, e["t"], until, moved)
        nvml = before[-1].get("nvml")
        row: dict[str, Any] = {
            "event": e["event"],
            "cotenant_bytes": e.get("held"),
            "nvml_free_before": nvml["free"] if nvml else None,
            "budget_s": to_budget,
            "fit_s": None,
            "nvml_free_s": None,
        }
        if to_budget is not None:
            fits = lambda s: all(r["held"] <= r["budget"] for r in s["replicas"].values())  # noqa: E731
            fit = _first(samples, e["t"] + to_budget, until, fits)
            row["fit_s"] = None if fit is None else to_budget + fit
        if margin_bytes is not None:
            freed = lambda s: s.get("nvml") and s["nvml"]["free"] >= margin_bytes  # noqa: E731
            row["nvml_free_s"] = _first(samples, e["t"], until, freed)
        out.append(row)
    return out


def accounting(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """NVML's device-wide use against the replicas' allocators and the memory model: the sum
    of `memory_allocated` minus the sum predicted (`Sizing.bytes_with`: weights + pool + one
    step), relative; and NVML used minus (the replicas' reserved + the co-tenant's bytes),
    which is what neither allocator counts (CUDA contexts, other processes)."""
    rel, unaccounted, rows = [], [], []
    for s in samples:
        rs = list(s["replicas"].values())
        if not rs:
            continue
        alloc = [r.get("allocated") for r in rs]
        reserved = [r.get("reserved") for r in rs]
        predicted = sum(r["predicted"] for r in rs)
        row = {"t": s["t"], "predicted": predicted, "cotenant": s.get("cotenant_bytes", 0)}
        if None not in alloc:
            row["allocated"] = sum(alloc)  # type: ignore[arg-type]
            rel.append((row["allocated"] - predicted) / max(predicted, 1))
        if s.get("nvml") and None not in reserved:
            row["nvml_used"] = s["nvml"]["used"]
            row["reserved"] = sum(reserved)  # type: ignore[arg-type]
            unaccounted.append(row["nvml_used"] - row["reserved"] - row["cotenant"])
        rows.append(row)
    return {
        "samples": len(rows),
        "allocated_vs_predicted": _spread(rel),
        "nvml_unaccounted_bytes": _spread(unaccounted),
        "every_10th": rows[::10],
    }


def _spread(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summary(
    samples: list[dict[str, Any]], events: list[dict[str, Any]], margin_bytes: int | None
) -> dict[str, Any]:
    return {
        "over_share": over_share(samples),
        "reactions": reactions(samples, events, margin_bytes),
        "accounting": accounting(samples),
    }
