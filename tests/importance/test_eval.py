"""Zero-shot protocol, perplexity and `rap eval`'s table, JSON and plot."""

from __future__ import annotations

import json
import math

import pytest
import torch

from rap.cli.main import main
from rap.core.loading import load_model
from rap.importance import zeroshot
from rap.importance.evaluate import loglikelihoods, split_pair


@pytest.mark.parametrize("task", zeroshot.TASKS)
def test_tasks_load_with_the_harness_shapes(task) -> None:
    items = zeroshot.load_task(task, limit=5)
    assert len(items) == 5
    for item in items:
        assert 0 <= item.gold < len(item.requests) and len(item.lengths) == len(item.requests)
        for ctx, cont in item.requests:
            assert ctx and cont.startswith(" ")
    first = items[0]
    if task == "winogrande":  # partial scoring: option-filled contexts, one shared continuation
        assert first.requests[0][1] == first.requests[1][1]
        assert first.requests[0][0] != first.requests[1][0]
    if task == "boolq":
        assert [c for _, c in first.requests] == [" no", " yes"]
        assert first.requests[0][0].endswith("?\nAnswer:")
    if task in ("piqa", "arc_easy", "arc_challenge"):
        assert first.requests[0][0].startswith("Question: ")


def test_hellaswag_preprocessing() -> None:
    assert zeroshot._hellaswag_pre(" A man [title] runs [step] fast.  ") == "A man. runs fast."


def test_encode_pair_moves_trailing_spaces() -> None:
    ctx, cont = split_pair(None, "Answer: ", "yes", vocab=256)
    assert bytes(ctx) == b"Answer:" and bytes(cont) == b" yes"


def test_loglikelihood_matches_a_plain_forward(tiny_dirs) -> None:
    """Batched, right-padded scores equal one sequence scored alone; greedy is consistent."""
    model = load_model(str(tiny_dirs["gemma3"]))
    requests = [("The cat sat", " on the mat"), ("A", " b"), ("Longer context here", " x y")]
    got = loglikelihoods(model, requests, batch_tokens=64)
    for (ctx, cont), (ll, _) in zip(requests, got, strict=True):
        ids = [b % model.dims.vocab for b in (ctx + cont).encode()]
        n = len(cont.encode())
        with torch.inference_mode():
            logits = model.hf(input_ids=torch.tensor([ids[:-1]]), use_cache=False).logits[0]
        logp = torch.log_softmax(logits.float(), -1)[-n:]
        ref = float(logp.gather(-1, torch.tensor(ids[-n:])[:, None]).sum())
        assert math.isclose(ll, ref, rel_tol=1e-4, abs_tol=1e-4)


def test_interval() -> None:
    assert math.isclose(zeroshot.interval95(0.5, 100), 0.098, rel_tol=1e-3)


def test_eval_command_on_a_tiny_model(tiny_dirs, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("RAP_CACHE_DIR", str(tmp_path / "cache"))
    model = str(tiny_dirs["llama"])
    imp = ["importance", "--model", model, "--method", "bi", "--tokens", "256", "--seq-len", "64"]
    assert main(imp) == 0  # attn-drop and mlp-drop read Block Influence from the cache
    out = tmp_path / "eval"
    args = [
        "eval",
        "--model",
        model,
        "--budgets",
        "1.0,0.6",
        "--methods",
        "random,attn-drop,mlp-drop",
        "--limit",
        "4",
        "--tasks",
        "piqa,winogrande,lambada",
        "--ppl-tokens",
        "256",
        "--ppl-seq-len",
        "64",
        "--batch",
        "2",
        "--seq",
        "64",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    result = json.loads((out / "results.json").read_text())
    assert result["tasks"] == {"piqa": 4, "winogrande": 4, "lambada": 4}
    assert result["workload"] == {**result["workload"], "batch": 2, "seq": 64, "dtype": "float16"}
    rows = {(r["budget"], r["method"]): r for r in result["rows"]}
    assert len(rows) == 6
    dense = [rows[(1.0, m)] for m in ("random", "attn-drop", "mlp-drop")]
    assert all(r["blocks_kept"] == 8 for r in dense)
    assert len({r["ppl"] for r in dense}) == 1  # one mask, evaluated once
    for (budget, _), row in rows.items():
        if "error" in row:
            assert budget == 0.6 and "MiB" in row["error"]
            continue
        assert row["predicted_bytes"] <= row["budget_bytes"] and row["ppl"] > 1
        assert 0.0 <= row["tasks"]["piqa"]["acc_norm"] <= 1.0
    table = (out / "results.md").read_text()
    assert "batch 2 × 64 tokens in float16" in table and "wiki.utf8" in table
    assert "PIQA 4" in table and "95 % interval" in table and "| 60% | random |" in table
    assert (out / "quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    capsys.readouterr()
    assert main([*args[:-2], "--out", str(out), "--methods", "nope"]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err


def test_eval_help_lists_the_methods_it_runs(capsys) -> None:
    """`rap eval` runs the policy and the searches beside the planners; only the
    oracle is refused, with where to run it."""
    from rap.cli.main import build_parser
    from rap.planning.planners import SERVING_PLANNERS

    sub = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    methods = next(a for a in sub["eval"]._actions if a.dest == "methods")
    assert "rap (the shipped policy)" in methods.help and "surrogate-milp" in methods.help
    assert set(methods.default.split(",")) == set(SERVING_PLANNERS)
    assert main(["eval", "--methods", "oracle", "--out", "x"]) == 2
    err = capsys.readouterr().err
    assert "does not run method 'oracle'" in err and "rap plan --method oracle" in err
    floor = next(a for a in sub["plan"]._actions if a.dest == "min_kept_fraction")
    from rap.serving.engine import EngineConfig

    serving = EngineConfig().min_kept_fraction
    assert floor.default == 0.0 and f"serving's default is {serving}" in floor.help


@pytest.mark.slow
def test_eval_on_the_default_model(tmp_path, capsys) -> None:
    """A few items on the real model: the dense row is far better than a 40 % budget's; the
    policy and the surrogate search run beside the planner, priced the same way."""
    out = tmp_path / "eval"
    args = [
        "eval",
        "--budgets",
        "1.0,0.4",
        "--methods",
        "oneshot,rap,surrogate-greedy",
        "--limit",
        "2",
        "--tasks",
        "piqa,lambada",
        "--ppl-tokens",
        "512",
        "--ppl-seq-len",
        "256",
        "--no-cache",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    rows = {
        (r["budget"], r["method"]): r
        for r in json.loads((out / "results.json").read_text())["rows"]
    }
    dense = rows[(1.0, "oneshot")]
    assert dense["blocks_kept"] == 60 and 10 < dense["ppl"] < 100
    assert all(rows[(1.0, m)]["blocks_kept"] == 60 for m in ("rap", "surrogate-greedy"))
    for method in ("oneshot", "rap", "surrogate-greedy"):
        small = rows[(0.4, method)]
        assert small["predicted_bytes"] <= small["budget_bytes"]
        assert small["ppl"] > 2 * dense["ppl"]
    capsys.readouterr()
