"""`rap heldout`'s results: Δ ln ppl against dense per domain, and paired intervals.

Input: the NLL of every window (`window_nll`) of every measured mask key, per domain, all keys
on the same windows. Per (budget, method) row:

    delta[d]     = ln ppl_d(mask) − ln ppl_d(dense), with its paired 95 % interval
    mean         = the mean of delta over the domains that are not `separate` (multilingual is
                   reported beside it, never in it: a text the model was not trained for)
    vs_best[d]   = ln ppl_d(mask) − ln ppl_d(best), paired interval; best = the row of the same
                   budget with the lowest mean; `vs_best["mean"]` resamples every domain at once

All intervals are `paired.paired_interval` (windows resampled, the same indices for both masks).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from rap.importance.heldout import DOMAINS
from rap.importance.paired import paired_interval

NllTable = Mapping[str, Mapping[str, Sequence[float]]]
"""mask key → domain → NLL per window (the same windows, in the same order, for every key)."""


def pooled(domains: Sequence[str]) -> list[str]:
    """The domains a mean over domains takes (module doc)."""
    return [d for d in domains if DOMAINS[d] != "separate"]


def _lnppl(nll: Sequence[float], window: int) -> float:
    return sum(nll) / (len(nll) * (window - 1))


def _pair(
    a: Mapping[str, Sequence[float]],
    b: Mapping[str, Sequence[float]],
    domains: list[str],
    window: int,
    draws: int,
) -> list[float] | None:
    """paired_interval over `domains` as [diff, low, high]; None where there is no domain."""
    if not domains:
        return None
    only_a, only_b = {d: a[d] for d in domains}, {d: b[d] for d in domains}
    return paired_interval(only_a, only_b, window, draws).as_list()


def summarise(rows: list[dict[str, Any]], nll: NllTable, window: int, draws: int) -> None:
    """Fill each planned row (`key` set; rows with `error` are left as they are) with its
    deltas, mean and intervals against dense and against its budget's best row, in place."""
    dense = nll[""]
    domains = list(dense)
    over = pooled(domains)
    for row in rows:
        if "error" in row:
            continue
        mine = nll[row["key"]]
        row["lnppl"] = {d: round(_lnppl(mine[d], window), 4) for d in domains}
        row["delta"] = {d: _pair(mine, dense, [d], window, draws) for d in domains}
        row["mean"] = _pair(mine, dense, over, window, draws)
    for budget in dict.fromkeys(r["budget"] for r in rows):
        planned = [r for r in rows if r["budget"] == budget and "error" not in r]
        if not planned:
            continue
        # Without a pooled domain (multilingual alone) the first domain decides.
        best = min(planned, key=lambda r: (r["mean"] or r["delta"][domains[0]])[0])
        for row in planned:
            mine, theirs = nll[row["key"]], nll[best["key"]]
            row["best"] = best["method"]
            row["vs_best"] = {d: _pair(mine, theirs, [d], window, draws) for d in domains}
            row["vs_best"]["mean"] = _pair(mine, theirs, over, window, draws)


def _cell(values: list[float] | None) -> str:
    if values is None:
        return "—"
    diff, low, high = values
    return f"{diff:+.3f} [{low:+.3f}, {high:+.3f}]"


def markdown(result: dict[str, Any]) -> str:
    """The header (what was measured on which text) and, per budget, one table of Δ ln ppl vs
    dense and one of the difference to the budget's best method."""
    domains = list(result["domains"])
    lines = [*_header(result)]
    for budget in result["budgets"]:
        rows = [r for r in result["rows"] if r["budget"] == budget]
        lines += ["", f"### Budget {budget:.0%}: Δ ln ppl vs dense, 95 % paired interval", ""]
        cols = ["Method", "Blocks kept", *domains, "Mean (" + ", ".join(pooled(domains)) + ")"]
        lines += ["| " + " | ".join(cols) + " |", "|---|---:|" + "---:|" * (len(cols) - 2)]
        for r in rows:
            if "error" in r:
                lines.append(f"| {r['method']} | — | does not fit: {r['error']} |")
                continue
            cells = [r["method"], f"{r['blocks_kept']}/{r['blocks']}"]
            cells += [_cell(r["delta"][d]) for d in domains] + [_cell(r["mean"])]
            lines.append("| " + " | ".join(cells) + " |")
        planned = [r for r in rows if "vs_best" in r]
        if not planned:
            continue
        lines += ["", f"Method − {planned[0]['best']} (the lowest mean at {budget:.0%}):", ""]
        cols = ["Method", *domains, "Mean"]
        lines += ["| " + " | ".join(cols) + " |", "|---|" + "---:|" * (len(cols) - 1)]
        for r in planned:
            cells = [r["method"], *(_cell(r["vs_best"][d]) for d in domains)]
            cells.append(_cell(r["vs_best"].get("mean")))
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _header(result: dict[str, Any]) -> list[str]:
    shape = result["shape"]
    lines = [
        f"# Held-out quality: {result['model']}, {result['split']} split",
        "",
        f"- **Masks**: `rap plan --budget-frac F --batch {shape['batch']} --seq {shape['seq']} "
        f"--dtype {result['dtype']}` for each method (activations inside the budget, as "
        "`rap plan` prices them).",
        f"- **Windows**: {result['window']:,} tokens, BOS (id {result['bos_id']}) first, "
        f"{result['window'] - 1:,} predicted; NLL computed in {result['compute_dtype']} on "
        f"{result['device']}.",
        "- **Dense ln ppl**: "
        + ", ".join(f"{d} {v:.3f}" for d, v in result["dense_lnppl"].items()),
        "",
        "| Domain | Role | Windows | Documents | Unread tokens | Short of the protocol |",
        "|---|---|---:|---:|---:|---|",
    ]
    for d, info in result["domains"].items():
        short = info["shortfall"] or "—"
        lines.append(
            f"| {d} | {info['role']} | {info['windows']} | {info['documents']} | "
            f"{info['stream_tokens']:,} | {short} |"
        )
    lines += ["", f"Command: `{result['command']}`"]
    return lines
