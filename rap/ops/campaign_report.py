"""The campaign's report: the table of cases with its figures (`markdown`) and the timeline
figure (`timeline`), from `rap.ops.campaign.judge`'s result and what the harness observed."""

from __future__ import annotations

from typing import Any

import numpy as np

from rap.ops.campaign import OUTCOMES, Observed, Plan, budget_at


def markdown(result: dict[str, Any], plan: Plan, head: str) -> str:
    lines = [head, "", "| case | expected | observed | held |", "|---|---|---|---|"]
    for c in result["cases"]:
        lines.append(
            f"| {c['case']} | {c['expect']} | {c['observed']} | {'yes' if c['ok'] else '**no**'} |"
        )
    t, e = result["ttft_s"], result["e2e_s"]

    def f(x: float | None) -> str:
        return "–" if x is None else f"{x:.2f}"

    lines += [
        "",
        f"Capacity {plan.capacity_rps:.2f} req/s (closed loop); offered "
        f"{result['offered_rps']['mean']:.2f} req/s on average, "
        f"{result['offered_rps']['peak']:.2f} at the busiest 10 s.",
        f"At the base load: {result['base_load']['detail']}.",
        f"Answered requests (ok): TTFT p50 {f(t['p50'])} s, p99 {f(t['p99'])} s; end to end "
        f"p50 {f(e['p50'])} s, p99 {f(e['p99'])} s.",
        f"Budget changes acknowledged in p50 {f(result['admin_latency_s']['p50'])} s, p99 "
        f"{f(result['admin_latency_s']['p99'])} s (the step counts from when it was sent).",
        f"Outcomes: {result['outcomes']}",
    ]
    return "\n".join(lines)


def timeline(
    obs: Observed, records: list[dict[str, Any]], plan: Plan, starts: dict[str, int], path: Any
) -> None:
    """Per replica bytes held against its budget; requests started per 5 s by outcome; the
    shock and every event marked."""
    import matplotlib  # lazy: optional (plots)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: optional (plots)

    names = sorted(starts)
    fig, ax = plt.subplots(len(names) + 1, 1, figsize=(10, 3 * (len(names) + 1)), sharex=True)
    for a, name in zip(ax, names, strict=False):
        pts = [(s["t"], s["replicas"][name]) for s in obs.samples if name in s["replicas"]]
        live = [(t, x) for t, x in pts if "error" not in x]
        t = [p[0] for p in live]
        a.plot(
            t,
            [(x["weight_bytes"] + x["kv_bytes_reserved"]) / 2**20 for _, x in live],
            label="held (measured)",
        )
        a.step(
            t,
            [budget_at(obs, name, x, starts[name]) / 2**20 for x in t],
            where="post",
            label="budget",
        )
        down = [p[0] for p in pts if "error" in p[1]]
        a.plot(down, [0] * len(down), "k|", label="no answer")
        a.set_ylabel(f"{name} MiB")
        a.legend(loc="lower left", fontsize=8)
    t0 = min((r["t"] for r in records), default=0.0)
    edges = np.arange(0, plan.duration_s + 5, 5.0)
    bottom = np.zeros(len(edges) - 1)
    for outcome in (*OUTCOMES, "connect_error"):
        at = [r["t"] - t0 for r in records if r.get("outcome") == outcome]
        if at:
            hist, _ = np.histogram(at, bins=edges)
            ax[-1].bar(edges[:-1], hist / 5.0, 5.0, bottom=bottom, align="edge", label=outcome)
            bottom += hist / 5.0
    ax[-1].set_ylabel("requests/s started")
    ax[-1].set_xlabel("seconds")
    ax[-1].legend(loc="upper right", fontsize=8)
    lo, hi = plan.shock_s()
    for a in ax:
        a.axvspan(lo, hi, color="orange", alpha=0.12)
        for e in plan.events:
            a.axvline(plan.at_s(e), color="red", lw=0.8, ls="--")
    for e in plan.events:
        ax[0].text(plan.at_s(e), ax[0].get_ylim()[1], e.name, rotation=90, va="top", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
