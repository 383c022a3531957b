"""`rap bench`'s figures from a `Run`: requests, service levels, bytes over budget,
quality served; a Markdown table and a timeline picture per system.

    completed   a 200 whose stream ended without an error, all its tokens received
    refused     a 503 (or 429): the server said no; it counts as a goodput miss
    failed      anything else (an error status, a broken stream)
    goodput     completed requests meeting both service levels (TTFT ≤ slo.ttft_s and
                TPOT = (done − first token) / (tokens − 1) ≤ slo.tpot_s) per second of the run
    over budget Σ max(0, bytes − budget) · Δt over the samples, in MiB·s, with bytes measured by
                the replica from its tensors (weights + KV pool) and the budget the trace's at
                that moment; `after compliance` counts only samples more than COMPLIANCE_S after
                the last budget drop; `compliance_s` is the longest time from a drop to the
                first sample within the new budget
    quality     tokens served under each mask (a response counts under the smallest mask it
                ran under, which it names: an upper bound on its cost), and the token-weighted
                Δ ln perplexity of those masks, twice: as the replica's planner predicts it (the
                surrogate) and measured (`add_measured`: ln perplexity of each mask on held-out
                Wikipedia in 1,024-token windows, longer than any served sequence; an estimate
                of the served text's cost, since the served text is other text)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from rap.ops.bench import Run
from rap.ops.traces import Trace

COMPLIANCE_S = 2.0
MIB = 2**20


def _pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def budget_at(run: Run, t: float, high: int) -> int:
    """The budget in force at wall time `t` (the high one before the first step)."""
    current = high
    for at, nbytes, _ in run.budget_steps:
        if at <= t:
            current = nbytes
    return current


def memory_figures(run: Run, high: int) -> dict[str, Any]:
    before = [high] + [nbytes for _, nbytes, _ in run.budget_steps[:-1]]
    drops = [(at, b) for (at, b, _), prev in zip(run.budget_steps, before, strict=True) if b < prev]
    over = over_after = peak = 0.0
    for a, b in zip(run.samples, run.samples[1:], strict=False):
        excess = a["bytes"] - budget_at(run, a["t"], high)
        dt = b["t"] - a["t"]
        peak = max(peak, excess)
        if excess > 0:
            over += excess * dt
            last_drop = max((at for at, _ in drops if at <= a["t"]), default=None)
            if last_drop is None or a["t"] - last_drop > COMPLIANCE_S:
                over_after += excess * dt
    compliance = []
    for at, nbytes in drops:
        within = [s["t"] for s in run.samples if s["t"] >= at and s["bytes"] <= nbytes]
        compliance.append(within[0] - at if within else None)
    prem = [s["preemptions"] for s in run.samples]
    return {
        "over_budget_mib_s": over / MIB,
        "over_budget_after_compliance_mib_s": over_after / MIB,
        "peak_excess_mib": max(peak, 0.0) / MIB,
        "compliance_s": compliance,
        "preemptions": (prem[-1] - prem[0]) if prem else None,
    }


def figures(run: Run, trace: Trace, high: int) -> dict[str, Any]:
    recs = run.records
    done = [r for r in recs if r.status == 200 and r.error is None and r.done_s is not None]
    refused = [r for r in recs if r.status in (429, 503)]
    failed = [r for r in recs if r not in done and r not in refused]
    ttft = [r.first_token_s - r.sent_s for r in done if r.first_token_s is not None]
    tpot = [
        (r.done_s - r.first_token_s) / (r.tokens - 1)
        for r in done
        if r.first_token_s is not None and r.done_s is not None and r.tokens > 1
    ]
    e2e = [r.done_s - r.sent_s for r in done if r.done_s is not None]
    good = [
        r
        for r in done
        if r.first_token_s is not None
        and r.done_s is not None
        and r.first_token_s - r.sent_s <= trace.slo.ttft_s
        and (r.tokens <= 1 or (r.done_s - r.first_token_s) / (r.tokens - 1) <= trace.slo.tpot_s)
    ]
    span = max((r.done_s or r.sent_s for r in recs), default=1.0)
    tokens: dict[str, int] = {}
    cost_tokens, cost = 0, 0.0
    for r in done:
        key = r.mask_key if r.mask_key is not None else "?"
        tokens[key] = tokens.get(key, 0) + r.tokens
        if r.predicted_delta_lnppl is not None:
            cost += r.predicted_delta_lnppl * r.tokens
            cost_tokens += r.tokens
    return {
        "system": run.system,
        "requests": len(recs),
        "completed": len(done),
        "refused": len(refused),
        "failed": len(failed),
        "failures": sorted({str(r.error)[:120] for r in failed})[:3],
        "goodput_rps": len(good) / span,
        "ttft_s": {"p50": _pct(ttft, 50), "p99": _pct(ttft, 99)},
        "tpot_s": {"p50": _pct(tpot, 50), "p99": _pct(tpot, 99)},
        "e2e_s": {"p50": _pct(e2e, 50), "p99": _pct(e2e, 99)},
        **memory_figures(run, high),
        "tokens_by_mask": tokens,
        "delta_lnppl_token_weighted": cost / cost_tokens if cost_tokens else None,
    }


def add_measured(rows: list[dict[str, Any]], lnppl: dict[str, float]) -> None:
    """Each row's token-weighted measured Δ ln perplexity over the dense model, from `lnppl`
    (mask key → ln perplexity, "" the dense model); masks not in it are left out and named."""
    for row in rows:
        served = {k: n for k, n in row["tokens_by_mask"].items() if k != "?"}
        known = {k: n for k, n in served.items() if k in lnppl}
        total = sum(known.values())
        row["delta_lnppl_measured"] = (
            sum(n * (lnppl[k] - lnppl[""]) for k, n in known.items()) / total if total else None
        )
        row["unmeasured_masks"] = sorted(set(served) - set(known))


def markdown(rows: list[dict[str, Any]]) -> str:
    def f(v: Any, fmt: str) -> str:
        return "–" if v is None else format(v, fmt)

    lines = [
        "| system | done | 503 | failed | goodput req/s | TTFT p50/p99 s | TPOT p50/p99 s "
        "| over budget MiB·s (after compliance) | peak excess MiB | compliance s | preempted "
        "| Δ ln ppl token-weighted: surrogate / measured |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        comp = [c for c in r["compliance_s"] if c is not None]
        missing = len(r["compliance_s"]) - len(comp)
        comp_text = f(max(comp) if comp else None, ".2f") + (
            f" ({missing} never)" if missing else ""
        )
        lines.append(
            f"| {r['system']} | {r['completed']}/{r['requests']} | {r['refused']} | {r['failed']} "
            f"| {r['goodput_rps']:.3f} "
            f"| {f(r['ttft_s']['p50'], '.2f')}/{f(r['ttft_s']['p99'], '.2f')} "
            f"| {f(r['tpot_s']['p50'], '.3f')}/{f(r['tpot_s']['p99'], '.3f')} "
            f"| {r['over_budget_mib_s']:.1f} ({r['over_budget_after_compliance_mib_s']:.1f}) "
            f"| {r['peak_excess_mib']:.1f} | {comp_text} | {f(r['preemptions'], 'd')} "
            f"| {f(r['delta_lnppl_token_weighted'], '.3f')} / "
            f"{f(r.get('delta_lnppl_measured'), '.3f')} |"
        )
    return "\n".join(lines)


def timeline(run: Run, high: int, path: Path) -> None:
    """Budget and bytes held, blocks kept, tokens/s, queue and refusals over the run."""
    import matplotlib  # lazy: optional (plots)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: optional (plots)

    t = [s["t"] for s in run.samples]
    fig, ax = plt.subplots(4, 1, figsize=(9, 8), sharex=True)
    ax[0].plot(t, [s["bytes"] / MIB for s in run.samples], label="held (measured)")
    ax[0].step(t, [budget_at(run, x, high) / MIB for x in t], where="post", label="budget")
    ax[0].set_ylabel("MiB")
    ax[0].legend(loc="lower left")
    ax[1].plot(t, [s["kept"] for s in run.samples])
    ax[1].set_ylabel("blocks kept")
    ax[2].plot(t, [s["tokens_per_s"] for s in run.samples])
    ax[2].set_ylabel("tokens/s")
    ax[3].plot(t, [s["waiting"] for s in run.samples], label="waiting")
    refused = [r.sent_s for r in run.records if r.status in (429, 503)]
    ax[3].plot(refused, [0] * len(refused), "rx", label="503")
    ax[3].set_ylabel("queue")
    ax[3].set_xlabel("seconds")
    ax[3].legend(loc="upper left")
    fig.suptitle(run.system)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
