"""The honest comparison: the RAP policy against the planners and search on its own reward.

Usage:
    .venv/bin/python bench/compare_policies.py [--policy DIR] [--per-scenario 12] [--seeds 2]
        [--measure] [--oracle 0 | --oracle-from FILE] [--out bench/results/compare.json]
    .venv/bin/python bench/compare_policies.py --policy DIR --split train --keys-out KEYS

Situations: every scenario of a split of `rap.agent.scenarios` (`validation` by default; `test`
only with `--final`, once per policy; every run appended to `bench/results/ledger.jsonl`),
taking `per-scenario` batch starts (evenly spaced) that need pruning and that some mask fits,
for the default model with float16 budgets (predicted peak, activations included). Every method
plans every situation at the same budget: `rap` (the policy; only masks it chose itself count as
its own: fallbacks are counted separately), `gsi`, `mem-greedy`, `shortgpt` and, with
`--oracle K`, the oracle (beam 1, 256 calibration tokens) on K of them (it measures hundreds of
masks per decision; `--oracle-from` reuses the masks of such a run). Reported per method:
quality as exp(mean ln perplexity) and the mean rise in ln perplexity over the dense model,
budget violations (a returned mask over budget), decision time p50/p99, the fallback rate, and
rap against each method situation by situation. `--split train --keys-out` lists the masks a
policy chooses on training scenarios instead (the DAgger step of scripts/train_policy.sh).
Quality is the surrogate's (`rap.planning.surrogate`) unless `--measure`: then every distinct
mask is measured on the `eval` part of the perplexity text (`rap.importance.quality`, wiki
tokens 512-1536, never used to fit the surrogate), cached; on the test split, on the test
text instead (`rap.importance.doc_text`: 33 whole documents each of wiki and C4 that no score,
fit or validation read, NLL per document), with intervals over documents and clustered mask
pairs (~37 s a mask on 2 CPU threads).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from ledger import append as ledger_append  # bench/ledger.py (the script's folder is on the path)
from ledger import check_split, policy_digest

from rap.agent import scenarios, workloads
from rap.agent.env import Observer
from rap.core import byte_table
from rap.core.errors import RapError
from rap.core.loading import load_config
from rap.core.masks import key_of
from rap.planning import HeuristicPolicy, RapPolicy
from rap.planning.policy import _policy_folder
from rap.planning.surrogate import load_surrogate

DTYPE = "float16"


def baselines(config: Any, model_id: str) -> dict[str, Any]:
    """gsi, shortgpt, and mem-greedy once per stored score kind it can use (its ranking is only
    as good as its costs: GSI's marginal costs, one-shot Δ NLL, or Block Influence)."""
    from rap.core.scores import find_scores

    out: dict[str, Any] = {}
    variants = [
        ("gsi", "gsi"),
        *[("mem-greedy", k) for k in ("gsi", "oneshot", "bi")],
        ("shortgpt", "bi"),
    ]
    for method, kind in variants:
        name = method if method != "mem-greedy" else f"mem-greedy ({kind})"
        try:
            h = HeuristicPolicy(config, model_id, DTYPE, method, scores=find_scores(model_id, kind))
        except RapError as exc:
            out[name] = _refusal(str(exc).split(";")[0])
            continue
        out[name] = lambda s, h=h: h.plan(s.budget_bytes, s.batch, s.seq, s.prefill)
    # Search on the policy's own reward (the surrogate), with the same byte accounting.
    from rap.planning.search import SEARCHES, SurrogateSearch

    for method in SEARCHES:
        search = SurrogateSearch(config, model_id, DTYPE, method)
        out[method] = lambda s, p=search: p.plan(s.budget_bytes, s.batch, s.seq, s.prefill)
    return out


def _refusal(why: str) -> Any:
    def plan(_s: scenarios.Situation) -> Any:
        raise RapError(why)

    return plan


def pick_situations(
    config: Any, obs: Observer, per: int, seeds: int, split: scenarios.Split = "validation"
) -> list[scenarios.Situation]:
    """Situations that need pruning and that some allowed mask fits, evenly spaced: the split's
    scenarios at its seeds (`scenarios.SEED_BASE[split]` + i; with split "train", for measuring
    the masks a policy chooses where it trains)."""
    out = []
    base_seed = scenarios.SEED_BASE[split]
    for name in scenarios.names(split):
        for i in range(seeds):
            sits = workloads.situations(name, config, DTYPE, base_seed + i, 400)
            ok = []
            for s in sits:
                base, sizes = obs.table(s.batch, s.seq, s.prefill)
                smallest = base + np.sort(sizes)[: obs.n - obs.max_drops].sum()
                if base + sizes.sum() > s.budget_bytes >= smallest:
                    ok.append(s)
            step = max(1, len(ok) // per)
            out += ok[::step][:per]
    return out


def write_policy_keys(policy: RapPolicy, sits: list[scenarios.Situation], path: Path) -> None:
    """The distinct masks the policy chose itself (fallbacks left out), one key a line."""
    keys: dict[str, None] = {}
    for s in sits:
        before = policy.fallbacks
        mask = policy.plan(s.budget_bytes, s.batch, s.seq, s.prefill)
        if policy.fallbacks == before:
            keys[key_of(mask.attn, mask.mlp)] = None
    path.write_text("".join(f"{k}\n" for k in keys))
    print(f"{len(keys)} distinct masks from {len(sits)} situations -> {path}")


def plan_all(methods: dict[str, Any], config: Any, sits: list[scenarios.Situation]) -> dict:
    """rows[method] = list of {key, ms, fits, error} per situation."""
    rows: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    for s in sits:
        for name, planner in methods.items():
            t0 = time.perf_counter()
            try:
                mask = planner(s)
                ms = 1e3 * (time.perf_counter() - t0)
                fits = byte_table.fits(
                    config,
                    mask,
                    s.budget_bytes,
                    s.batch,
                    s.seq,
                    DTYPE,
                    include_activations=True,
                    prefill_tokens=s.prefill,
                )
                rows[name].append({"key": key_of(mask.attn, mask.mlp), "ms": ms, "fits": fits})
            except RapError as exc:
                rows[name].append({"key": None, "error": str(exc).split(";")[0]})
    return rows


def oracle_rows(sits: list[scenarios.Situation], k: int) -> tuple[list[int], list[dict]]:
    """The oracle on k situations: the first k/2 weights-dominated ones (batch 1) and the
    first KV-dominated ones of the traffic scenarios (batch ≥ 8, ≥ 1,536 tokens)."""
    import torch

    from rap.core.loading import load_model
    from rap.importance.calibration import calibration_chunks
    from rap.importance.oracle import oracle_mask

    torch.set_num_threads(1)
    b1 = [i for i, s in enumerate(sits) if s.batch == 1][: k // 2]
    kv = [
        i for i, s in enumerate(sits) if s.batch >= 8 and s.seq >= 1536 and "grid" not in s.scenario
    ][: k - len(b1)]
    model = load_model("smollm2", dtype="float32", device="cpu")
    ids, _ = calibration_chunks(model.tokenizer, 256, 256, model.dims.vocab)
    rows = []
    for i in b1 + kv:
        s = sits[i]
        t0 = time.perf_counter()
        plan = oracle_mask(
            model,
            ids,
            s.budget_bytes,
            s.batch,
            s.seq,
            DTYPE,
            beam=1,
            include_activations=True,
            prefill_tokens=s.prefill,
        )
        rows.append(
            {
                "key": key_of(plan.mask.attn, plan.mask.mlp),
                "ms": 1e3 * (time.perf_counter() - t0),
                "fits": True,
            }
        )
    return b1 + kv, rows


def stored_oracle(sits: list[scenarios.Situation], path: str) -> tuple[list[int], list[dict]]:
    """Oracle masks from an earlier run (`bench/results/oracle_subset.json`) on the situations
    they were planned for: the oracle depends on the situation only, and costs minutes a mask."""
    doc = json.loads(Path(path).read_text())
    where = {(s.scenario, s.batch, s.seq, s.budget_bytes): i for i, s in enumerate(sits)}
    idx, rows = [], []
    for o in doc["situations"]:
        i = where.get((o["scenario"], o["batch"], o["seq"], o["budget"]))
        if i is None:
            fix = "use the --per-scenario and --seeds of the run that stored it"
            raise RapError(
                f"{path}: no situation {o['scenario']} B{o['batch']} S{o['seq']}", fix=fix
            )
        idx.append(i)
        rows.append({"key": o["oracle"], "ms": doc["p50_ms"], "fits": True})
    return idx, rows


def quality(keys: set[str], measure: bool, split: str) -> tuple[dict[str, float], dict | None]:
    """ln perplexity per mask key — the surrogate's, or measured: on the validation's eval
    text, or for the test split on the test text (`rap.importance.doc_text`: whole documents
    of wiki and C4, whose NLL per document comes back too, for intervals)."""
    if not measure:
        sur = load_surrogate()
        ks = sorted(keys)
        return dict(zip(ks, sur.predict(ks).tolist(), strict=True)), None
    import torch
    from tqdm import tqdm

    from rap.core.loading import load_model
    from rap.importance.doc_text import DocMeter, lnppl
    from rap.importance.quality import Meter

    torch.set_num_threads(2)
    model = load_model("smollm2", dtype="float32", device="cpu")
    ordered = sorted(keys, key=len)
    if split != "test":
        meter = Meter(model, "eval")
        return {k: meter.lnppl(k) for k in tqdm(ordered, desc="eval text")}, None
    docs = DocMeter(model)
    nll = {k: docs.nll(k) for k in tqdm(ordered, desc="test text, masks")}
    return {k: lnppl(v) for k, v in nll.items()}, nll


def summarize(rows: list[dict], q: dict[str, float], dense: float, idx: list[int]) -> dict:
    """One table row over the situations `idx`."""
    sel = [rows[i] for i in idx]
    ok = [r for r in sel if r.get("key") is not None]
    ln = np.array([q[r["key"]] for r in ok]) if ok else np.array([np.nan])
    ms = [r["ms"] for r in ok] or [np.nan]
    return {
        "situations": len(sel),
        "planned": len(ok),
        "ppl": float(np.exp(ln.mean())),
        "dlnppl": float(ln.mean() - dense),
        "violations": sum(not r["fits"] for r in ok),
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "errors": sorted({r["error"] for r in sel if "error" in r})[:2],
    }


def paired(
    rows: dict, q: dict[str, float], nll: dict | None = None, against: str = "rap", seed: int = 0
) -> dict:
    """`against` vs each other method on the situations both planned: situations it was better
    (worse) in by more than 1e-4 nats, and the mean difference in ln perplexity (negative = it
    is better) with a 95 % bootstrap interval: over situations (text noise not in it), or with
    per-document NLL (`nll`, the test text) over documents and clustered mask pairs
    (`rap.importance.doc_text.bootstrap_pairs`)."""
    from rap.importance.doc_text import bootstrap_pairs

    rng = np.random.default_rng(seed)
    out = {}
    for m, rs in rows.items():
        keys = [
            (a["key"], b["key"])
            for a, b in zip(rows[against], rs, strict=True)
            if a.get("key") is not None and b.get("key") is not None
        ]
        pairs = [(q[a], q[b]) for a, b in keys]
        if m == against or not pairs:
            continue
        d = np.array([a - b for a, b in pairs])
        if nll is None:
            boot = d[rng.integers(0, len(d), (2000, len(d)))].mean(1)
            ci = [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))]
        else:
            ci = bootstrap_pairs(nll, keys, seed=seed)["ci95"]
        out[m] = {
            "n": len(d),
            "mean_diff": float(d.mean()),
            "ci95": ci,
            "better": int((d < -1e-4).sum()),
            "worse": int((d > 1e-4).sum()),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", help="exported policy folder (default: the packaged one)")
    parser.add_argument("--per-scenario", type=int, default=12)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--measure", action="store_true", help="measured ppl (else surrogate)")
    parser.add_argument("--oracle", type=int, default=0, help="situations for the oracle")
    parser.add_argument("--oracle-from", help="reuse stored oracle masks (oracle_subset.json)")
    parser.add_argument("--out", default="bench/results/compare.json")
    parser.add_argument(
        "--split",
        choices=["validation", "test", "train"],
        default="validation",
        help="validation (every tuning decision); test (only with --final, once per policy); "
        "train (with --keys-out only)",
    )
    parser.add_argument("--final", action="store_true", help="the one test-split run of a policy")
    parser.add_argument(
        "--keys-out",
        help="write the masks the policy chose (one key a line) "
        "and stop: the input of `python -m rap.importance.quality measure --keys`",
    )
    args = parser.parse_args()
    if args.split == "train" and not args.keys_out:
        parser.error("--split train only lists the policy's masks: add --keys-out FILE")
    config, model_id = load_config("smollm2")
    policy = RapPolicy.load(args.policy, config, model_id, DTYPE)
    digest = policy_digest(_policy_folder(args.policy))
    refusal = None if args.keys_out else check_split(args.split, args.final, digest)
    if refusal:
        parser.error(refusal)
    sits = pick_situations(config, policy.observer, args.per_scenario, args.seeds, args.split)
    if args.keys_out:
        write_policy_keys(policy, sits, Path(args.keys_out))
        return
    methods: dict[str, Any] = {
        "rap": lambda s: policy.plan(s.budget_bytes, s.batch, s.seq, s.prefill)
    }
    methods.update(baselines(config, model_id))
    rows = plan_all(methods, config, sits)
    oracle_idx: list[int] = []
    if args.oracle or args.oracle_from:
        oracle_idx, orows = (
            stored_oracle(sits, args.oracle_from)
            if args.oracle_from
            else oracle_rows(sits, args.oracle)
        )
        rows["oracle"] = [{"key": None, "error": "not run"}] * len(sits)
        for i, r in zip(oracle_idx, orows, strict=True):
            rows["oracle"][i] = r
    keys = {r["key"] for rs in rows.values() for r in rs if r.get("key") is not None} | {""}
    q, nll = quality(keys, args.measure, args.split)
    report = tables(rows, q, sits, oracle_idx, policy, args, nll)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1, default=float))
    ledger_append(ledger_record(report, args, digest))
    print(markdown(report))


def ledger_record(report: dict[str, Any], args: argparse.Namespace, digest: str) -> dict:
    """The headline of a run, for `bench/results/ledger.jsonl`."""
    every = report["groups"]["all"]
    return {
        "split": args.split,
        "final": args.final,
        "policy_digest": digest,
        "policy": args.policy or "shipped default",
        "quality": report["quality"],
        "situations": report["situations"],
        "command": "python bench/compare_policies.py " + " ".join(sys.argv[1:]),
        "dlnppl": {m: r["dlnppl"] for m, r in every.items() if r["planned"]},
        "planned": {m: r["planned"] for m, r in every.items()},
        "rap_vs": {
            m: {k: r[k] for k in ("better", "worse", "mean_diff", "ci95")}
            for m, r in report["rap_vs"].items()
        },
    }


def tables(
    rows: dict,
    q: dict,
    sits: list,
    oracle_idx: list[int],
    policy: RapPolicy,
    args: argparse.Namespace,
    nll: dict | None = None,
) -> dict[str, Any]:
    dense = q[""]
    text = "test text (wiki + C4 documents)" if nll is not None else "eval text"
    groups = {
        "all": list(range(len(sits))),
        "weights-dominated (batch 1)": [i for i, s in enumerate(sits) if s.batch == 1],
        "KV-dominated (batch ≥ 8, ≥ 1,536 tokens)": [
            i for i, s in enumerate(sits) if s.batch >= 8 and s.seq >= 1536
        ],
    }
    if oracle_idx:
        groups["oracle subset"] = oracle_idx
    return {
        "quality": f"measured ({text})" if args.measure else "surrogate",
        "dense_ppl": float(np.exp(dense)),
        "situations": len(sits),
        "split": args.split,
        "scenarios": scenarios.names(args.split),
        "policy": {**policy.net.meta, "decisions": policy.decisions, "fallbacks": policy.fallbacks},
        "rap_vs": paired(rows, q, nll),
        "nll_per_document": nll,
        "groups": {
            g: {
                m: summarize(rs, q, dense, idx)
                for m, rs in rows.items()
                if g == "oracle subset" or m != "oracle"
            }
            for g, idx in groups.items()
            if idx
        },
        "per_situation": [
            {
                "scenario": s.scenario,
                "batch": s.batch,
                "seq": s.seq,
                "budget": s.budget_bytes,
                **{m: rs[i].get("key") for m, rs in rows.items()},
            }
            for i, s in enumerate(sits)
        ],
    }


def markdown(report: dict[str, Any]) -> str:
    p = report["policy"]
    rate = p["fallbacks"] / p["decisions"] if p["decisions"] else 0.0
    lines = [
        f"Quality: {report['quality']}; dense ppl {report['dense_ppl']:.2f}; "
        f"{report['situations']} situations; policy fallbacks {p['fallbacks']}/"
        f"{p['decisions']} ({rate:.1%})",
        "",
    ]
    for group, by in report["groups"].items():
        lines += [
            f"**{group}**",
            "",
            "| method | planned | ppl | Δ ln ppl | violations | p50 ms | p99 ms |",
            "|---|---|---|---|---|---|---|",
        ]
        for m, r in by.items():
            if not r["planned"]:
                why = "; ".join(r["errors"]) or "not run"
                lines.append(f"| {m} | 0/{r['situations']} | – | – | – | – | – ({why}) |")
                continue
            lines.append(
                f"| {m} | {r['planned']}/{r['situations']} | {r['ppl']:.2f} | "
                f"{r['dlnppl']:.3f} | {r['violations']} | {r['p50_ms']:.3f} | "
                f"{r['p99_ms']:.3f} |"
            )
        lines.append("")
    lines += [
        "**rap against each method, situation by situation** (Δ = rap − method in ln ppl)",
        "",
        "| method | rap better | rap worse | mean Δ | 95 % CI (situations) |",
        "|---|---|---|---|---|",
    ]
    for m, r in report["rap_vs"].items():
        lo, hi = r["ci95"]
        lines.append(
            f"| {m} | {r['better']}/{r['n']} | {r['worse']}/{r['n']} | "
            f"{r['mean_diff']:+.3f} | [{lo:+.3f}, {hi:+.3f}] |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
