"""Masks that change while rows run (rap.serving.row_masks, rap.core.gates): a shrink reaches
every running row at the next step, a restore only rows admitted after it, and each row computes
what it would alone with its own mask switched at the same positions."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import torch

import rap
from rap.core.masks import KeepMask
from rap.serving import row_masks, switching
from rap.serving.engine import Engine
from rap.serving.scheduler import Request, Scheduler
from tests.serving.test_engine import CONFIG, roomy
from tests.serving.test_scheduler import PROMPTS, Collect, run, scheduler
from tests.tiny import ARCHS


def record_logits(sched: Scheduler) -> dict[int, list[torch.Tensor]]:
    """Each row's logits at every token it samples, by row id."""
    seen: dict[int, list[torch.Tensor]] = defaultdict(list)
    original = sched._pick

    def pick(wanted: list[tuple[Any, torch.Tensor]]) -> list[tuple[Any, int]]:
        for row, logits in wanted:
            seen[row.id].append(logits.clone())
        return original(wanted)

    sched._pick = pick  # type: ignore[method-assign]
    return seen


def reference(
    model: Any,
    prompt: list[int],
    tokens: list[int],
    history: list[tuple[int, str]],
    resumed_at: tuple[int, ...] = (),
) -> list[torch.Tensor]:
    """The row's logits from the model's own forward, unbatched, no pages and no gates: one
    token per call into a `DynamicCache` (a `MaskedCache`, so a dropped first layer does not
    restart positions), the model's skips switched at the positions the row's history names,
    teacher-forced with `tokens`. A preemption (an admission at 0 tokens after the first, at
    `resumed_at` tokens) starts a fresh cache and recomputes the prefix under the row's mask
    then, as the engine does."""
    n, seq = model.num_layers, list(prompt) + list(tokens)
    runs: list[list[tuple[int, KeepMask]]] = []
    for held, key in history:
        if held == 0:
            runs.append([])
        runs[-1].append((held, KeepMask.from_key(model.model_id, n, key)))
    starts = [len(prompt) - 1, *(t - 1 for t in resumed_at), len(seq) - 1]
    assert len(runs) == len(starts) - 1, (history, resumed_at)
    out: list[torch.Tensor] = []
    for run_changes, lo, hi in zip(runs, starts[:-1], starts[1:], strict=True):
        cache = None
        for p in range(hi):
            while run_changes and run_changes[0][0] <= p:
                mask = run_changes.pop(0)[1]
                model.apply(mask)
                narrowed = model.new_cache(mask)
                narrowed.layers = cache.layers if cache is not None else narrowed.layers
                cache = narrowed
            with torch.inference_mode():
                logits = model.hf(
                    input_ids=torch.tensor([seq[p : p + 1]]),
                    position_ids=torch.tensor([[p]]),
                    past_key_values=cache,
                    use_cache=True,
                ).logits[0, -1]
            if p >= lo:
                out.append(logits.float())
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_rows_that_join_shrink_skip_restored_blocks_or_are_preempted_match_the_reference(
    arch: str, served: dict[str, Path]
) -> None:
    """Three rows run; the model drops blocks (every row loses them at the next step, pages in
    the dropped attention layer freed); the youngest is preempted and recomputed; then the
    blocks come back and a fourth row joins dense while the first ones go on skipping what was
    restored: one gated forward per step, and every row's logits those of the unbatched
    reference with its skips switched at the same positions."""
    model = rap.load_model(str(served[arch]), device="cpu")
    sched, got = scheduler(model), Collect()
    batched = record_logits(sched)
    for i, p in enumerate(PROMPTS):
        sched.add(Request(list(p), 14, ignore_eos=True), got.sink(i))
    for _ in range(4):
        sched.step()
    small = KeepMask.from_drops(model.model_id, model.num_layers, drop_attn="1", drop_mlp="0,2")
    switching.switch(sched, small)
    assert 1 not in sched.pool.keys
    assert all(1 not in r.pages and 1 not in r.reserved for r in sched.running)
    sched.step()
    victim = sched.running[-1]
    resumed_at = len(victim.tokens)
    sched.preempt(victim)
    for _ in range(3):
        sched.step()
    assert victim in sched.running and victim.preemptions == 1
    switching.switch(sched, model.dense_mask())
    sched.add(Request([30, 31, 32], 10, ignore_eos=True), got.sink(3))
    sched.step()
    mixed = {r.mask.key for r in sched.running}
    assert mixed == {small.key, ""}, mixed  # old rows skip what came back, the new one not
    run(sched)
    assert sched.stats.forwards == sched.stats.steps  # gated rows share one forward per step
    assert sched.pool.used_pages() == 0
    for i, prompt in enumerate([*PROMPTS, [30, 31, 32]]):
        done = got.done(i)
        resumed = (resumed_at,) if i == 2 else ()
        want = reference(model, prompt, done["token_ids"], done["mask_history"], resumed)
        have = batched[i + 1]
        assert len(want) == len(have)
        for k, (a, b) in enumerate(zip(have, want, strict=True)):
            assert torch.allclose(a, b, atol=1e-3, rtol=1e-3), (arch, i, k, (a - b).abs().max())
        if i < 3:
            assert done["mask_changes"] == 1 and done["fingerprint"].endswith("-changes1")
        else:
            assert done["mask_changes"] == 0 and "-changes" not in done["fingerprint"]


def test_a_row_under_two_masks_keeps_their_intersection(served: dict[str, Path]) -> None:
    """Switching between an attention-heavy and an MLP-heavy mask leaves a running row with
    less than either: why the engine must not thrash (its effective mask is reported)."""
    model = rap.load_model(str(served["llama"]), device="cpu")
    sched, got = scheduler(model), Collect()
    sched.add(Request([5, 6, 7], 12, ignore_eos=True), got.sink(0))
    sched.step()
    n = model.num_layers
    attn_heavy = KeepMask.from_drops(model.model_id, n, drop_mlp="0,1")
    mlp_heavy = KeepMask.from_drops(model.model_id, n, drop_attn="2,3")
    switching.switch(sched, attn_heavy)
    sched.step()
    switching.switch(sched, mlp_heavy)
    run(sched)
    done = got.done(0)
    effective = KeepMask.from_key(model.model_id, n, done["mask_history"][-1][1])
    assert effective.key == row_masks.intersect(attn_heavy, mlp_heavy).key
    assert effective.kept_fraction < min(attn_heavy.kept_fraction, mlp_heavy.kept_fraction)
    assert done["mask_changes"] == 2 and done["fingerprint"].endswith("-changes2")


def test_the_engine_shrinks_under_a_running_request_without_waiting(served_dir_llama) -> None:
    """Part 1 let running rows finish under their mask first (the budget was exceeded
    meanwhile); now the shrink reaches the running row at its next step."""
    model = rap.load_model(str(served_dir_llama), device="cpu")
    engine = Engine(model, CONFIG, roomy(model), None)
    n = model.num_layers
    small = KeepMask.from_drops(model.model_id, n, drop_attn="1", drop_mlp="0")

    async def main() -> list[dict]:
        events, switched_while_running = [], False
        async for event in engine.submit(Request([5, 6, 7], 200, ignore_eos=True)):
            events.append(event)
            if len(events) == 3:
                engine.set_ceiling(small)
            if engine.running and model.mask.key == small.key:
                switched_while_running = True
        assert switched_while_running
        return events

    t0 = time.monotonic()
    events = asyncio.run(main())
    assert events[-1]["type"] == "done" and "-changes1" in events[-1]["fingerprint"]
    assert time.monotonic() - t0 < 60


@pytest.fixture(scope="module")
def served_dir_llama(served: dict[str, Path]) -> Path:
    return served["llama"]


def test_a_preempted_row_resumes_by_recompute_where_it_stopped(
    served: dict[str, Path],
) -> None:
    """Its pages go back at once; readmitted, it recomputes prompt + generated tokens and goes
    on with the logits it would have had without the preemption; one start event."""
    model = rap.load_model(str(served["qwen2"]), device="cpu")
    sched, got = scheduler(model), Collect()
    seen = record_logits(sched)
    sched.add(Request([5, 6, 7, 8], 12, ignore_eos=True), got.sink(0))
    for _ in range(5):
        sched.step()
    (row,) = sched.running
    resumed = len(row.tokens)
    sched.preempt(row)
    assert sched.pool.used_pages() == 0 and sched.waiting[0] is row
    run(sched)
    done = got.done(0)
    assert sum(e["type"] == "start" for e in got.events[0]) == 1
    assert len(done["token_ids"]) == 12 and sched.stats.preempted == 1
    want = reference(model, [5, 6, 7, 8], done["token_ids"], done["mask_history"], (resumed,))
    for a, b in zip(seen[1], want, strict=True):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


def test_a_budget_drop_under_running_rows_cuts_the_pool_at_once(served_dir_llama) -> None:
    """Part 1 kept the whole pool until the running rows ended; now the pool is compacted
    and cut (youngest rows preempted only if their reservations cannot fit) while they run,
    and the bytes held fall to the new budget within a step."""
    model = rap.load_model(str(served_dir_llama), device="cpu")
    engine = Engine(model, CONFIG, roomy(model), None)
    full = engine.scheduler.pool.capacity

    async def main() -> list[list[dict]]:
        streams = [engine.submit(Request([5 + i, 6, 7], 60, ignore_eos=True)) for i in range(3)]
        firsts = [await s.__anext__() for s in streams]
        assert all(f["type"] == "start" for f in firsts)
        budget = engine.sizing.bytes_with(model.mask, full // 4)
        engine.set_budget(budget)
        for _ in range(200):
            if engine.scheduler.pool.capacity < full:
                break
            await asyncio.sleep(0.01)
        held = model.weight_bytes() + engine.kv_bytes_held() + engine.sizing.step_bytes()
        assert held <= budget and engine.running >= 1
        return [[e async for e in s] for s in streams]

    results = asyncio.run(main())
    assert all(r[-1]["type"] == "done" for r in results)  # nothing lost, preempted or not
    assert engine.scheduler.pool.used_pages() == 0


def test_memory_that_returns_grows_the_pool_under_running_rows(served_dir_llama) -> None:
    """The pool used to wait for every running row to end before it grew back (the new pool
    sized to the whole budget never fit beside the old layer being copied): under a steady
    queue the returned memory stayed unused (the memory-shock bench). Now it
    grows while the rows run, as far as the copy allows, and stays within the budget."""
    model = rap.load_model(str(served_dir_llama), device="cpu")
    budget = roomy(model)
    engine = Engine(model, CONFIG, budget, None)
    full = engine.scheduler.pool.capacity

    async def wait_until(check) -> None:
        for _ in range(500):
            if check():
                return
            await asyncio.sleep(0.01)

    async def main() -> list[list[dict]]:
        streams = [engine.submit(Request([5 + i, 6, 7], 240, ignore_eos=True)) for i in range(2)]
        firsts = [await s.__anext__() for s in streams]
        assert all(f["type"] == "start" for f in firsts)
        engine.set_budget(engine.sizing.bytes_with(model.mask, full // 4))
        await wait_until(lambda: engine.scheduler.pool.capacity <= full // 4)
        cut = engine.scheduler.pool.capacity
        engine.set_budget(budget)
        await wait_until(lambda: engine.scheduler.pool.capacity > cut)
        assert engine.running >= 1 and engine.scheduler.pool.capacity > cut
        held = model.weight_bytes() + engine.kv_bytes_held() + engine.sizing.step_bytes()
        assert held <= budget
        return [[e async for e in s] for s in streams]

    results = asyncio.run(main())
    assert all(r[-1]["type"] == "done" for r in results)


def test_the_no_thrash_rule_shrinks_now_grows_when_settled_and_crosses_only_when_forced(
    served: dict[str, Path],
) -> None:
    """`row_masks.next_mask`, the rule the engine runs (and bench/mask_rules.py replays)."""
    model = rap.load_model(str(served["llama"]), device="cpu")
    n, dense = model.num_layers, model.dense_mask()
    small = KeepMask.from_drops(model.model_id, n, drop_mlp="0,1")
    other = KeepMask.from_drops(model.model_id, n, drop_attn="2,3")
    rule = row_masks.next_mask
    assert rule(dense, small, settled=False, running=True, forced=False).key == small.key
    assert rule(small, dense, settled=False, running=False, forced=False).key == small.key
    assert rule(small, dense, settled=True, running=True, forced=False).key == dense.key
    assert rule(small, other, settled=True, running=True, forced=False).key == small.key
    assert rule(small, other, settled=True, running=False, forced=False).key == other.key
    both = row_masks.intersect(small, other)
    assert rule(small, other, settled=False, running=True, forced=True).key == both.key
    assert both.kept_fraction < 0.6 <= other.kept_fraction  # below the floor: the target
    assert rule(small, other, settled=False, running=True, forced=True, floor=0.6).key == other.key
