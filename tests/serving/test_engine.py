"""The replica's engine without Ray: batching, streaming, admission and plans."""

from __future__ import annotations

import asyncio

import pytest

import rap
from rap.core import memory
from rap.core.masks import KeepMask, MaskVersion
from rap.serving.engine import Engine, EngineConfig, GenRequest
from rap.serving.messages import MaskPlan, PlanEntry
from tests.tiny import FnPlanner, save_tiny, save_tokenizer

PROMPTS = [
    [5, 9, 14],
    [7, 8, 9, 10, 11, 12, 13, 20, 21],
    [30],
    [40, 41, 42, 43, 44, 45],
    [50, 51],
    [60, 61, 62, 63],
    [70, 71, 72, 73, 74, 75, 76],
    [80, 81, 82, 83, 84],
]


@pytest.fixture(scope="module")
def served_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("served")
    save_tiny("llama", folder)
    save_tokenizer(folder)
    return folder


def drop_everything_but(model, attn: int, mlp: int) -> KeepMask:
    """A planner stand-in: keep the first `attn` attention and `mlp` MLP blocks."""
    n = model.num_layers
    return KeepMask(
        model=model.model_id,
        attn=tuple(i < attn for i in range(n)),
        mlp=tuple(i < mlp for i in range(n)),
    )


async def collect(engine: Engine, prompt: list[int], max_tokens: int = 10) -> list[dict]:
    return [e async for e in engine.submit(GenRequest(prompt, max_tokens))]


def run(engine: Engine, prompts, max_tokens: int = 10) -> list[list[dict]]:
    async def main():
        return await asyncio.gather(*(collect(engine, p, max_tokens) for p in prompts))

    return asyncio.run(main())


def ids_of(model, events: list[dict]) -> str:
    return "".join(e["text"] for e in events if e["type"] == "token")


@pytest.mark.parametrize("drop_attn0", [False, True])
def test_eight_prompts_batch_and_match_unbatched(served_dir, drop_attn0: bool) -> None:
    model = rap.load_model(str(served_dir), device="cpu")
    if drop_attn0:
        model.apply(KeepMask.from_drops(model.model_id, model.num_layers, drop_attn="0"))
    engine = Engine(model, EngineConfig(batch_wait_s=0.1), 10**10, None)
    engine.plan = None
    if drop_attn0:  # keep the mask: a plan for every bucket
        engine.set_plan(
            MaskPlan(
                replica="r",
                version=MaskVersion(seq=1),
                entries=[PlanEntry(max_batch=64, max_seq=10**6, mask=model.mask)],
            )
        )
    results = run(engine, PROMPTS)
    assert engine.stats.batches <= 2
    for prompt, events in zip(PROMPTS, results, strict=True):
        alone = model.generate_ids([prompt], 10).token_ids[0]
        assert ids_of(model, events) == model.decode(alone)
        assert events[0]["type"] == "start" and events[-1]["type"] == "done"
        assert events[-1]["completion_tokens"] == len(alone)


def test_first_token_arrives_while_the_batch_runs(served_dir) -> None:
    model = rap.load_model(str(served_dir), device="cpu")
    engine = Engine(model, EngineConfig(), 10**10, None)
    seen_running = []

    async def main():
        async for event in engine.submit(GenRequest([5, 6, 7], 40)):
            if event["type"] == "token" and not seen_running:
                seen_running.append(engine.stats.running)

    asyncio.run(main())
    assert seen_running == [1]  # the batch was still generating when the first token came


def test_budget_below_dense_uses_a_fitting_local_mask(served_dir) -> None:
    model = rap.load_model(str(served_dir), device="cpu")
    dense_peak = memory.peak_bytes(model.config, model.mask, 1, 13, model.dtype, 3)
    small = drop_everything_but(model, 4, 1)
    budget = memory.peak_bytes(model.config, small, 1, 13, model.dtype, 3)
    assert budget < dense_peak
    engine = Engine(
        model,
        EngineConfig(min_kept_fraction=0.5),
        budget,
        FnPlanner(lambda b, B, S: drop_everything_but(model, 4, 1)),
    )
    (events,) = run(engine, [[5, 6, 7]])
    assert events[-1]["type"] == "done"
    assert model.mask.attn == small.attn and model.mask.mlp == small.mlp
    assert engine.stats.local_fallbacks == 1 and engine.stats.over_budget_bytes <= 0


def test_oversized_batch_is_split(served_dir) -> None:
    model = rap.load_model(str(served_dir), device="cpu")
    one = memory.peak_bytes(model.config, model.mask, 1, 19, model.dtype, 9)
    engine = Engine(model, EngineConfig(batch_wait_s=0.1), one, None)
    results = run(engine, PROMPTS[:3])
    assert all(r[-1]["type"] == "done" for r in results)
    assert engine.stats.batches == 3  # each prompt alone: the budget holds one at a time
    assert engine.stats.over_budget_bytes <= 0


def test_below_the_floor_is_refused_with_a_reason(served_dir) -> None:
    model = rap.load_model(str(served_dir), device="cpu")
    engine = Engine(
        model,
        EngineConfig(min_kept_fraction=0.75),
        1000,
        FnPlanner(lambda b, B, S: drop_everything_but(model, 1, 0)),
    )
    (events,) = run(engine, [[5, 6, 7]])
    assert events == [events[0]] and events[0]["type"] == "error"
    assert events[0]["status"] == 503 and "not enough memory" in events[0]["message"]
    assert events[0]["retry_after"] == 2 and model.mask.kept_fraction == 1.0


def test_a_plan_governs_the_next_batch_and_budget_drop_shrinks_idle_model(served_dir) -> None:
    model = rap.load_model(str(served_dir), device="cpu")
    engine = Engine(
        model, EngineConfig(), 10**10, FnPlanner(lambda b, B, S: drop_everything_but(model, 4, 2))
    )
    small = drop_everything_but(model, 3, 3).model_copy(
        update={"version": MaskVersion(epoch=1), "source": "controller:rap"}
    )
    assert engine.set_plan(
        MaskPlan(
            replica="r",
            version=MaskVersion(epoch=1),
            entries=[PlanEntry(max_batch=8, max_seq=4096, mask=small)],
        )
    )
    assert not engine.set_plan(MaskPlan(replica="r", version=MaskVersion(epoch=0, seq=9)))
    (events,) = run(engine, [[5, 6, 7]])
    assert model.mask == small and events[0]["fingerprint"] == small.fingerprint()
    assert "controller:rap" in events[0]["fingerprint"]
    assert engine.stats.batches_on_controller_mask == 1

    async def shrink():
        engine.plan = None
        engine.set_budget(model.predicted_weight_bytes(drop_everything_but(model, 4, 2)) + 10**5)
        await engine._fit_idle_model()

    asyncio.run(shrink())
    assert model.weight_bytes() <= engine.budget_bytes


def test_requests_that_can_never_run_are_400(served_dir) -> None:
    model = rap.load_model(str(served_dir), device="cpu")
    engine = Engine(model, EngineConfig(), 10**10, None)
    from rap.serving.engine import EngineError

    with pytest.raises(EngineError, match="exceeds the model's context of 256") as exc:
        engine.check(GenRequest([5] * 250, 10))
    assert exc.value.status == 400
