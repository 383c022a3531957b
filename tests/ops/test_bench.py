"""`rap bench`: the figures from a run, and a short trace against the live app."""

from __future__ import annotations

import pytest

from rap.ops import bench, bench_report
from rap.ops.traces import BudgetStep, ServiceLevels, Trace, TraceRequest

MIB = 2**20


def short_trace(n: int = 12) -> Trace:
    trace = Trace(
        name="short",
        description="tests: a deep shock from 3 s to 9 s",
        lengths_source="fixed",
        length_scale=1.0,
        slo=ServiceLevels(ttft_s=5.0, tpot_s=0.5),
        seed=0,
        requests=[TraceRequest(t=0.5 + i, prompt_tokens=32, max_tokens=8) for i in range(n)],
        budget=[
            BudgetStep(t=0.0, fraction=1.0, label="high"),
            BudgetStep(t=3.0, fraction=0.4, label="co-tenant takes 60 %"),
            BudgetStep(t=9.0, fraction=1.0, label="given back"),
        ],
    )
    return trace.model_copy(update={"sha256": trace.digest()})


def test_figures_count_refusals_service_levels_and_bytes_over_budget() -> None:
    run = bench.Run("x", stretch=1.0)
    ok = bench.Record(0, 0.0, 32, 8, 200, first_token_s=0.5, done_s=1.2, tokens=8, mask_key="")
    slow = bench.Record(1, 0.0, 32, 8, 200, first_token_s=6.0, done_s=7.0, tokens=8, mask_key="a1")
    refused = bench.Record(2, 1.0, 32, 8, 503, error="not enough memory")
    broken = bench.Record(3, 1.0, 32, 8, -1, error="ConnectionResetError")
    run.records = [ok, slow, refused, broken]
    run.budget_steps = [(0.0, 100 * MIB, "high"), (2.0, 40 * MIB, "deep"), (8.0, 100 * MIB, "back")]
    # Held 90 MiB until 5 s (3 s over the 40 MiB budget after the drop at 2 s), then 30 MiB.
    run.samples = [
        {"t": t, "bytes": (90 if t < 5 else 30) * MIB, "preemptions": 1 if t > 4 else 0}
        for t in [x * 0.5 for x in range(21)]
    ]
    f = bench_report.figures(run, short_trace(), 100 * MIB)
    assert (f["completed"], f["refused"], f["failed"]) == (2, 1, 1)
    assert f["goodput_rps"] == pytest.approx(1 / 7.0)  # only `ok` meets TTFT ≤ 5 s
    assert f["over_budget_mib_s"] == pytest.approx(50 * 3.0)
    assert f["over_budget_after_compliance_mib_s"] == pytest.approx(50 * 0.5)  # from 4.5 s
    assert f["peak_excess_mib"] == pytest.approx(50)
    assert f["compliance_s"] == [pytest.approx(3.0)] and f["preemptions"] == 1
    assert f["tokens_by_mask"] == {"": 8, "a1": 8}
    assert "| x | 2/4 | 1 | 1 |" in bench_report.markdown([f])


def test_measured_quality_is_token_weighted_over_the_dense_model() -> None:
    rows = [{"tokens_by_mask": {"": 10, "a3": 30, "?": 5}}, {"tokens_by_mask": {"m9": 4}}]
    bench_report.add_measured(rows, {"": 3.0, "a3": 3.2})
    assert rows[0]["delta_lnppl_measured"] == pytest.approx(30 * 0.2 / 40)
    assert rows[0]["unmeasured_masks"] == []
    assert rows[1]["delta_lnppl_measured"] is None and rows[1]["unmeasured_masks"] == ["m9"]


def test_each_system_is_a_configuration_of_the_app() -> None:
    from rap.serving.config import ServeAppConfig

    scale = bench.Scale(
        high_bytes=10 * 2**30, low_bytes=4 * 2**30, weights_bytes=1, running_kv_bytes=1
    )
    for name in bench.SYSTEMS:
        cfg = ServeAppConfig.model_validate(bench.system_config(name, scale, "a3,m10", 8))
        e = cfg.engine
        assert e.follow_budget == (name not in ("dense-high", "dense-low", "static"))
        assert (e.min_kept_fraction == 1.0) == name.startswith("dense")
        assert (e.static_mask == "a3,m10") == (name == "static")
        assert (cfg.policy == "rap") == (name == "rap")
        assert (cfg.planner == "surrogate-greedy") == (name == "rap-heuristic")
    with pytest.raises(ValueError, match="unknown system"):
        bench.system_config("vllm", scale, "", 8)


@pytest.mark.slow
def test_a_short_shock_against_the_live_app(tmp_path) -> None:
    """dense-high ignores a deep shock (its measured bytes stay over the budget); rap gets
    within it while the shock lasts; every request completes on both."""
    from rap.cli.bench import read_doc
    from rap.cli.main import main

    path = tmp_path / "short.json"
    path.write_text(short_trace().model_dump_json())
    out = tmp_path / "out"
    args = ["bench", "--trace", str(path), "--systems", "dense-high,rap", "--rate", "1"]
    assert main([*args, "--batch", "4", "--out", str(out)]) == 0
    doc = read_doc(out / "bench.json.gz")
    assert doc["trace"]["sha256"] == short_trace().sha256
    by = {r["system"]: r for r in doc["runs"]}
    for name, run in by.items():
        figures = next(s for s in doc["systems"] if s["system"] == name)
        assert figures["completed"] == 12 and figures["failed"] == 0, figures["failures"]
        assert figures["delta_lnppl_measured"] is not None and not figures["unmeasured_masks"]
        (drop_t, low, _) = run["budget_steps"][1]
        (back_t, _, _) = run["budget_steps"][2]
        during = [s for s in run["samples"] if drop_t + 1 < s["t"] < back_t]
        assert during
        if name == "dense-high":
            assert min(s["bytes"] for s in during) > low
        else:
            assert any(s["bytes"] <= low for s in during)
    assert (out / "timeline-rap.png").stat().st_size > 0 and (out / "bench.md").exists()
