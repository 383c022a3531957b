"""The engine's adaptive paths, reached through its own decisions (a budget it is given, requests
it is sent) and checked against what a model computes alone: what must hold before and after
the engine is restructured. Each test names the mutation it kills (mutants/, scripts/mutants.py).

The engine runs in the test thread, one loop turn at a time (`tests.serving.engine_driver`), so
which step a change lands in is decided by the engine, not by the machine's speed.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
import torch

import rap
from rap.core.masks import KeepMask
from rap.serving.rows import Request, Row
from tests.reference import reference_logits
from tests.serving.engine_driver import CONFIG, SteppedEngine, add, run_out, turn
from tests.serving.test_engine import roomy
from tests.serving.test_row_masks import record_logits, reference
from tests.serving.test_scheduler import Collect, run, scheduler
from tests.tiny import FnPlanner


@pytest.fixture(scope="module")
def llama(served: dict[str, Path]) -> Path:
    return served["llama"]


def dense_logits(model: Any, prompt: list[int], generated: list[int]) -> list[torch.Tensor]:
    """Teacher-forced logits at every generated position, from the hand-written residual
    forward of the whole sequence (tests/reference.py) with every block kept."""
    ids = torch.tensor([list(prompt) + list(generated)])
    n = model.num_layers
    logits = reference_logits(model.hf, ids, [True] * n, [True] * n)[0]
    return [logits[p].float() for p in range(len(prompt) - 1, len(prompt) + len(generated) - 1)]


def assert_close(have: list[torch.Tensor], want: list[torch.Tensor], what: str) -> None:
    assert len(have) == len(want), (what, len(have), len(want))
    for k, (a, b) in enumerate(zip(have, want, strict=True)):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), (what, k, (a - b).abs().max())


def test_a_budget_drop_under_running_rows_compacts_the_pool_and_preempts_the_youngest(
    llama: Path,
) -> None:
    """Three rows run; the budget falls to a pool that holds the two oldest rows' reservations
    only. At the next step the youngest is preempted, the survivors' pages at or above the new
    capacity move below it (K and V with them) and the slabs are cut; the survivors go on and
    the youngest is readmitted and recomputed. Every row's logits are the dense model's own,
    teacher-forced on its tokens.
    Kills: no K/V copy in `_compact` (moved pages hold another row's KV), `fit` preempting the
    oldest or nobody."""
    model = rap.load_model(str(llama), device="cpu")
    engine = SteppedEngine(model, CONFIG, roomy(model), None)
    got = Collect()
    seen = record_logits(engine.scheduler)
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23]]
    rows = [
        add(engine, Request(p, 30, ignore_eos=True), got.sink(i)) for i, p in enumerate(prompts)
    ]
    for _ in range(24):
        turn(engine)
    oldest, middle, youngest = rows
    cut = sum(max(r.reserved.values()) for r in (oldest, middle))  # the two oldest fit
    assert cut < sum(max(r.reserved.values()) for r in rows)
    high = [p for r in (oldest, middle) for rp in r.pages.values() for p in rp.pages if p >= cut]
    assert high, "no survivor holds a page the cut must move: the test would prove nothing"
    budget = engine.sizing.bytes_with(model.mask, cut)
    engine.set_budget(budget)
    turn(engine)
    sched = engine.scheduler
    assert sched.pool.capacity == cut
    assert [r.preemptions for r in rows] == [0, 0, 1] and sched.stats.preempted == 1
    assert youngest in sched.waiting and sched.running == [oldest, middle]
    assert all(p < cut for r in sched.running for rp in r.pages.values() for p in rp.pages)
    held = model.weight_bytes() + engine.kv_bytes_held() + engine.sizing.step_bytes()
    assert held <= budget
    run_out(engine)
    assert sched.pool.used_pages() == 0 and youngest.preemptions == 1
    for i, prompt in enumerate(prompts):
        done = got.done(i)
        assert done["type"] == "done" and len(done["token_ids"]) == 30, done
        assert sum(e["type"] == "start" for e in got.events[i]) == 1
        assert_close(seen[rows[i].id], dense_logits(model, prompt, done["token_ids"]), f"row {i}")


def nucleus_draw(logits: torch.Tensor, temperature: float, top_p: float, g: torch.Generator) -> int:
    """The test's own sampler: softmax(logits / T); with top_p < 1, only the most probable
    tokens, in order, until the mass before the next one reaches top_p; one multinomial draw
    from `g` (one per token, as a seeded request makes)."""
    probs = torch.softmax(logits / temperature, dim=-1)
    weights = torch.zeros_like(probs)
    mass = 0.0
    for index in sorted(range(len(probs)), key=lambda i: -float(probs[i])):
        if top_p < 1.0 and mass >= top_p:
            break
        weights[index] = probs[index]
        mass += float(probs[index])
    return int(torch.multinomial(weights, 1, generator=g))


def independent_tokens(model: Any, request: Request) -> list[int]:
    """What a seeded request must generate: each token drawn by `nucleus_draw` from the dense
    model's logits over the prompt and the tokens drawn so far."""
    g = torch.Generator().manual_seed(request.seed or 0)
    out: list[int] = []
    for _ in range(request.max_tokens):
        ids = torch.tensor([request.prompt_ids + out])
        n = model.num_layers
        logits = reference_logits(model.hf, ids, [True] * n, [True] * n)[0, -1].float()
        if request.temperature <= 0:
            out.append(int(logits.argmax()))
        else:
            out.append(nucleus_draw(logits, request.temperature, request.top_p, g))
    return out


def test_sampled_rows_draw_what_an_independent_sampler_draws_with_the_same_seed(
    llama: Path,
) -> None:
    """Greedy and sampled rows (two temperatures, with and without top_p) share steps and
    prefill chunks; each sampled row's tokens are what the test's own sampler draws from the
    model's logits with a generator seeded the same way; and they are not what greedy decoding,
    temperature 1 or no nucleus would give (so a scheduler that ignored either would fail).
    Kills: every row decoded greedily."""
    model = rap.load_model(str(llama), device="cpu")
    requests = [
        Request([5, 6, 7], 12, ignore_eos=True),
        Request([5, 6, 7], 12, temperature=0.7, top_p=0.6, seed=11, ignore_eos=True),
        Request([8, 9, 10, 11, 12, 13, 14], 12, temperature=1.6, seed=5, ignore_eos=True),
        Request([20, 21], 12, temperature=1.2, top_p=0.5, seed=7, ignore_eos=True),
    ]
    sched, got = scheduler(model), Collect()
    for i, r in enumerate(requests):
        sched.add(r, got.sink(i))
    run(sched)
    for i, r in enumerate(requests):
        have = got.done(i)["token_ids"]
        assert have == independent_tokens(model, r), (i, have)
        if r.temperature > 0:
            greedy = Request(r.prompt_ids, r.max_tokens, ignore_eos=True)
            assert have != independent_tokens(model, greedy), (i, "greedy gives the same")
    for i in (1, 3):  # top_p decides: without the nucleus the same seed draws otherwise
        r = requests[i]
        wide = Request(r.prompt_ids, r.max_tokens, r.temperature, 1.0, seed=r.seed)
        assert got.done(i)["token_ids"] != independent_tokens(model, wide), i
    r = requests[2]  # the temperature decides: at 1.0 the same seed draws otherwise
    plain = Request(r.prompt_ids, r.max_tokens, 1.0, 1.0, seed=r.seed)
    assert got.done(2)["token_ids"] != independent_tokens(model, plain)


def test_no_step_runs_more_than_max_step_tokens_and_prompts_fill_what_decodes_leave(
    llama: Path,
) -> None:
    """Two rows decode while two long prompts arrive: every forward carries at most
    `max_step_tokens` tokens, the decoding rows get a token every step, and the prompts are
    fed in chunks of what the decodes leave of the step (here 5 − 2 = 3 tokens).
    Kills: a prefill chunk that ignores the decode tokens already in the step."""
    model = rap.load_model(str(llama), device="cpu")
    sched, got = scheduler(model, max_step_tokens=5), Collect()
    sched.add(Request([5, 6], 30, ignore_eos=True), got.sink(0))
    sched.add(Request([7, 8], 30, ignore_eos=True), got.sink(1))
    sched.step()
    sched.step()  # both prompts in, both decoding
    sizes: list[int] = []
    forward = model.hf.forward

    def counted(*a: Any, **kw: Any) -> Any:
        sizes.append(int(kw["input_ids"].shape[1]))
        return forward(*a, **kw)

    model.hf.forward = counted
    long_prompts = [list(range(4, 34)), list(range(40, 61))]  # 30 and 21 tokens
    for i, p in enumerate(long_prompts, 2):
        sched.add(Request(p, 4, ignore_eos=True), got.sink(i))
    before = [len(got.events[0])]
    for _ in range(12):
        sched.step()
        before.append(len(got.events[0]))
    model.hf.forward = forward
    assert all(n <= 5 for n in sizes), sizes
    assert sizes[:10] == [5] * 10, sizes  # 2 decodes + a 3-token chunk while prompts remain
    assert all(b - a == 1 for a, b in itertools.pairwise(before))
    run(sched)
    assert all(got.done(i)["type"] == "done" for i in range(4))


def test_admission_is_fifo_under_a_full_pool(llama: Path) -> None:
    """A request that does not fit the pages left waits at the head of the queue, and a later
    one that would fit does not overtake it: both start once the running row's pages are back,
    in arrival order.
    Kills: admission skipping a head that does not fit (`break` → `continue`)."""
    model = rap.load_model(str(llama), device="cpu")
    sched, got = scheduler(model, pages=12), Collect()  # 12 pages of 4 tokens
    sched.add(Request([5, 6, 7], 29, ignore_eos=True), got.sink(0))  # 32 tokens: 8 pages
    sched.step()
    sched.add(Request([8, 9, 10], 17, ignore_eos=True), got.sink(1))  # 5 pages: 8 + 5 > 12
    sched.add(Request([11, 12], 6, ignore_eos=True), got.sink(2))  # 2 pages: would fit
    started: dict[int, int] = {}
    for k in range(60):
        sched.step()
        for i in (1, 2):
            if got.events[i] and i not in started:
                started[i] = k
        if len(started) == 2:
            break
    assert got.done(0)["type"] == "done"  # both waited for row 0's pages
    assert started[1] == started[2], started  # then started together, in arrival order
    order = [row.request.prompt_ids[0] for row in sched.running]
    assert order == [8, 11], order
    run(sched)


def test_a_stream_preempted_below_its_reservation_waits_at_the_head_and_resumes(
    llama: Path,
) -> None:
    """A budget cut leaves a pool smaller than a running row's reservation: the row is
    preempted and waits at the head of the queue (not refused); a small request behind it
    waits too (nobody overtakes it), a new one too big for the pool is refused at once; when
    memory returns the preempted row resumes first and generates what it would have without
    the cut.
    Kills: a preempted row too big for the pool refused like a new request."""
    model = rap.load_model(str(llama), device="cpu")
    engine = SteppedEngine(model, CONFIG, roomy(model), None)
    got = Collect()
    seen = record_logits(engine.scheduler)
    first = add(engine, Request([5, 6, 7], 45, ignore_eos=True), got.sink(0))  # 12 pages
    for _ in range(4):
        turn(engine)
    engine.set_budget(engine.sizing.bytes_with(model.mask, 6))
    turn(engine)
    assert engine.scheduler.pool.capacity == 6 and first.preemptions == 1
    small = add(engine, Request([8, 9], 4, ignore_eos=True), got.sink(1))  # 2 pages
    add(engine, Request(list(range(4, 40)), 8), got.sink(2))  # 11 pages > 6
    for _ in range(3):
        turn(engine)
    assert got.done(2)["code"] == "insufficient_memory"
    assert list(engine.scheduler.waiting) == [first, small] and got.events[1] == []
    engine.set_budget(roomy(model))
    turn(engine)
    assert engine.scheduler.running[0] is first
    run_out(engine)
    done = got.done(0)
    assert done["type"] == "done" and len(done["token_ids"]) == 45
    assert_close(seen[first.id], dense_logits(model, [5, 6, 7], done["token_ids"]), "resumed")
    assert got.done(1)["type"] == "done"


def test_a_shrink_reaches_running_rows_at_the_next_step(llama: Path) -> None:
    """The budget falls while two rows decode; the planner's smaller mask keeps their pages.
    Seen from outside the scheduler: the very next forward runs under the smaller mask, the
    dropped blocks' weights and the dropped attention layer's slab are gone after that turn,
    and each row's logits from that token on are those of the model switched there (the
    switch position taken from the tokens the client had, not from the engine's history).
    Kills: a shrink that waits for the running rows to end."""
    model = rap.load_model(str(llama), device="cpu")
    n = model.num_layers
    small = KeepMask.from_drops(model.model_id, n, drop_attn="1", drop_mlp="0")
    engine = SteppedEngine(model, CONFIG, roomy(model), FnPlanner(lambda b, B, S: small))
    assert model.mask.kept_fraction == 1.0
    got = Collect()
    seen = record_logits(engine.scheduler)
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12]]
    rows: list[Row] = [
        add(engine, Request(p, 16, ignore_eos=True), got.sink(i)) for i, p in enumerate(prompts)
    ]
    for _ in range(5):
        turn(engine)
    streamed = [sum(e["type"] == "token" for e in got.events[i]) for i in range(2)]
    masks_at_forward: list[str] = []
    forward = model.hf.forward

    def watched(*a: Any, **kw: Any) -> Any:
        masks_at_forward.append(model.mask.key)
        return forward(*a, **kw)

    model.hf.forward = watched
    engine.set_budget(engine.sizing.bytes_with(small, 40))  # dense holds no full batch there
    turn(engine)
    model.hf.forward = forward
    assert masks_at_forward == [small.key]
    assert model.weight_bytes() == model.predicted_weight_bytes(small)
    assert 1 not in engine.scheduler.pool.keys and engine.scheduler.stats.preempted == 0
    assert engine.scheduler.pool.capacity == 40  # the budget's pool under the smaller mask
    run_out(engine)
    for i, prompt in enumerate(prompts):
        done = got.done(i)
        switch_at = len(prompt) + streamed[i] - 1  # the tokens the row had fed before the turn
        history = [(0, ""), (switch_at, small.key)]
        want = reference(model, prompt, done["token_ids"], history)
        assert_close(seen[rows[i].id], want, f"row {i}")
        assert done["mask_changes"] == 1
