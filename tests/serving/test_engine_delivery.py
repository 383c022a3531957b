"""What reaches a client, whatever happens to its row: a stream that waits for memory to return
after a budget cut below the floor and says why when it does not, a slow reader that holds its
row back without losing a token, a stalled reader that is cancelled, and exactly one terminal
event even when delivering it fails (rap.serving.engine, rap.serving.outbox)."""

from __future__ import annotations

import asyncio

import pytest

import rap
from rap.core import memory
from rap.serving import scheduler as scheduler_module
from rap.serving.engine import Engine, EngineConfig
from rap.serving.openai_relay import Relay
from rap.serving.rows import Request
from tests.serving.test_engine import keep_first, roomy
from tests.serving.test_scheduler import scheduler
from tests.tiny import FnPlanner

CONFIG = EngineConfig(page_tokens=4, max_step_tokens=8, target_seq=64, grow_after_s=0)
POLLS = 2_000  # loop iterations of 10 ms at most: a bound on a wait, never a timing assertion


async def until(condition, what: str) -> None:
    for _ in range(POLLS):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never happened: {what}")


def below_floor(model) -> int:
    """A budget that holds the weights of a 1-attention-block mask and no KV page."""
    return memory.weight_bytes(model.config, keep_first(model, 1, 0), model.dtype)


def greedy(model, prompt: list[int], n: int) -> list[int]:
    return model.generate_ids([prompt], n).token_ids[0][:n]


def floor_engine(model, max_wait_s: float) -> Engine:
    config = CONFIG.model_copy(update={"min_kept_fraction": 0.75, "max_wait_s": max_wait_s})
    planner = FnPlanner(lambda b, B, S: keep_first(model, 1, 0))  # below the floor: never taken
    return Engine(model, config, roomy(model), planner)


def test_a_stream_cut_below_the_floor_waits_and_goes_on_when_memory_returns(served_dir) -> None:
    model = rap.load_model(str(served_dir), device="cpu")
    prompt, n = [5, 6, 7], 40
    want = greedy(model, prompt, n)
    engine = floor_engine(model, max_wait_s=600)

    async def main() -> list[dict]:
        stream = engine.submit(Request(prompt, n, ignore_eos=True))
        events = [await stream.__anext__(), await stream.__anext__()]  # start, a token
        engine.set_budget(below_floor(model))  # what POST /admin/budget does
        await until(lambda: engine.scheduler.stats.preempted == 1, "the row is preempted")
        assert engine.scheduler.pool.capacity == 0 and not engine.scheduler.running
        engine.set_budget(roomy(model))  # memory returns before max_wait_s
        return events + [e async for e in stream]

    events = asyncio.run(main())
    assert events[-1]["type"] == "done", events[-1]
    assert events[-1]["token_ids"] == want  # recomputed where it stopped: nothing lost


def test_a_stream_cut_below_the_floor_ends_with_a_code_naming_the_cause(served_dir) -> None:
    model = rap.load_model(str(served_dir), device="cpu")
    engine = floor_engine(model, max_wait_s=0.5)

    async def main() -> tuple[list[dict], list[dict]]:
        stream = engine.submit(Request([5, 6, 7], 40, ignore_eos=True))
        events = [await stream.__anext__(), await stream.__anext__()]
        engine.set_budget(below_floor(model))
        events += [e async for e in stream]
        late = [e async for e in engine.submit(Request([8, 9], 4))]  # a new request, meanwhile
        return events, late

    events, late = asyncio.run(main())
    end = events[-1]
    assert end["type"] == "error" and end["status"] == 503 and end["retry_after"] == 2
    assert end["code"] == "budget_below_floor" and "quality floor" in end["message"]
    assert late[-1]["code"] == "budget_below_floor"  # at once: the router tries elsewhere
    assert [e["type"] for e in late] == ["error"]


def test_a_budget_below_floor_reaches_the_client_as_openai_errors() -> None:
    """The same events through the OpenAI relay: a 503 body for a whole response (the router
    adds Retry-After), an error chunk naming the code for a stream."""
    cut = {"type": "error", "status": 503, "code": "budget_below_floor", "message": "m"}
    events = [{"type": "start", "fingerprint": "rap-x", "prompt_tokens": 3}, cut]

    async def feed():
        for e in events:
            yield e

    async def main():
        status, body = await Relay("m", chat=True).whole(feed())
        chunks = [c async for c in Relay("m", chat=True).stream(feed())]
        return status, body, chunks

    status, body, chunks = asyncio.run(main())
    assert status == 503 and body["error"]["code"] == "budget_below_floor"
    assert body["error"]["type"] == "server_error"
    assert '"code": "budget_below_floor"' in chunks[0] and chunks[-1] == "data: [DONE]\n\n"


def test_a_slow_reader_holds_its_row_back_and_loses_nothing(served_dir) -> None:
    model = rap.load_model(str(served_dir), device="cpu")
    config = CONFIG.model_copy(update={"max_pending_events": 4, "client_stall_s": 600})
    engine = Engine(model, config, roomy(model), None)
    slow_prompt, fast_prompt = [5, 6, 7], [8, 9, 10]
    want = greedy(model, slow_prompt, 60)

    async def main() -> tuple[list[dict], list[dict]]:
        slow = engine.submit(Request(slow_prompt, 60, ignore_eos=True))
        head = [await slow.__anext__()]  # start; then the client reads nothing for a while
        fast = [e async for e in engine.submit(Request(fast_prompt, 30, ignore_eos=True))]
        (row,) = engine.scheduler.running
        assert len(row.generated) <= 4  # held back at its outbox's bound
        assert row.pages and engine.scheduler.pool.used_pages() > 0
        return head + [e async for e in slow], fast

    slow_events, fast_events = asyncio.run(main())
    assert fast_events[-1]["type"] == "done" and len(fast_events[-1]["token_ids"]) == 30
    assert slow_events[-1]["type"] == "done" and slow_events[-1]["token_ids"] == want


def test_a_stalled_reader_is_cancelled_and_its_pages_freed(served_dir) -> None:
    model = rap.load_model(str(served_dir), device="cpu")
    config = CONFIG.model_copy(update={"max_pending_events": 2, "client_stall_s": 0.2})
    engine = Engine(model, config, roomy(model), None)

    async def main() -> list[dict]:
        stream = engine.submit(Request([5, 6, 7], 60, ignore_eos=True))
        events = [await stream.__anext__()]
        sched = engine.scheduler
        await until(lambda: not sched.running, "the stalled row leaves")
        assert sched.pool.used_pages() == 0
        return events + [e async for e in stream]

    events = asyncio.run(main())
    assert events[-1]["type"] == "error" and events[-1]["code"] == "client_stalled"
    assert len([e for e in events if e["type"] == "token"]) <= 2


def test_a_last_event_that_fails_to_build_still_ends_the_request(served_dir, monkeypatch) -> None:
    model = rap.load_model(str(served_dir), device="cpu")
    engine = Engine(model, CONFIG, roomy(model), None)

    def broken(*args, **kwargs):
        raise RuntimeError("done event bug")

    monkeypatch.setattr(scheduler_module, "done_event", broken)
    events = asyncio.run(_collect(engine, Request([5, 6, 7], 5, ignore_eos=True)))
    assert events[-1]["type"] == "error" and events[-1]["code"] == "generation_failed"
    assert "done event bug" in events[-1]["message"]
    assert not engine.scheduler.running and engine.error is None
    monkeypatch.undo()
    assert asyncio.run(_collect(engine, Request([5, 6], 3)))[-1]["type"] == "done"


def test_a_planner_that_cannot_price_the_mask_still_gives_the_done_event(served_dir) -> None:
    model = rap.load_model(str(served_dir), device="cpu")

    class Unpriced(FnPlanner):
        def quality_cost(self, mask):
            raise ValueError("no estimate")

    engine = Engine(model, CONFIG, roomy(model), Unpriced(lambda b, B, S: model.dense_mask()))
    events = asyncio.run(_collect(engine, Request([5, 6, 7], 5)))
    assert events[-1]["type"] == "done" and events[-1]["predicted_delta_lnppl"] is None


@pytest.mark.parametrize("fail_on", ["token", "done", "cancelled"])
def test_a_sink_that_raises_gets_exactly_one_terminal_event(served_dir, fail_on) -> None:
    """The scheduler alone: a sink raising on a row's token, its done event or the done event
    of its cancellation ends that row with one error event in the same step; the other row is
    untouched."""
    model = rap.load_model(str(served_dir), device="cpu")
    sched = scheduler(model)
    got: dict[int, list[dict]] = {0: [], 1: []}
    raise_on = "done" if fail_on == "cancelled" else fail_on

    def sink(key: int):
        def put(event: dict) -> None:
            if key == 0 and event["type"] == raise_on and {"type": "raised"} not in got[0]:
                got[0].append({"type": "raised"})
                raise RuntimeError("client bug")
            got[key].append(event)

        return put

    first = sched.add(Request([5, 6, 7], 6, ignore_eos=True), sink(0))
    sched.add(Request([8, 9], 6, ignore_eos=True), sink(1))
    if fail_on == "cancelled":
        sched.step()
        sched.cancel(first)
    for _ in range(40):
        if got[1][-1:] and got[1][-1]["type"] == "done":
            break
        sched.step()
    terminal = [e for e in got[0] if e["type"] in ("done", "error")]
    assert len(terminal) == 1 and terminal[0]["code"] == "generation_failed", got[0]
    assert got[0][-2] == {"type": "raised"} and first not in [r.id for r in sched.running]
    assert got[1][-1]["type"] == "done" and len(got[1][-1]["token_ids"]) == 6


async def _collect(engine: Engine, request: Request) -> list[dict]:
    return [e async for e in engine.submit(request)]
