"""A router call becomes an engine request off the event loop, bounded before tokenizing
(rap.serving.intake)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

import rap
from rap.serving.engine import Engine, EngineError
from rap.serving.intake import Intake, longest_token_chars
from tests.serving.test_engine import CONFIG, roomy
from tests.tiny import save_tiny, save_tokenizer


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("served")
    save_tiny("llama", folder)
    save_tokenizer(folder)
    return rap.load_model(str(folder), device="cpu")


def call(**kw):
    return {"model": "m", "prompt": "a b c", "max_tokens": 4, **kw}


def test_tokenization_runs_off_the_event_loop_in_one_thread(model) -> None:
    """The replica tokenized on its event loop: a 6 MB prompt stalled every stream for 4.8 s."""
    engine = Engine(model, CONFIG, roomy(model), None)
    intake = Intake(model, engine, "m")
    threads: set[str] = set()
    real = model.encode

    def slow_encode(text, chat=True):
        threads.add(threading.current_thread().name)
        time.sleep(0.3)
        return real(text, chat)

    model.encode = slow_encode
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        end = time.monotonic() + 0.5
        while time.monotonic() < end:
            ticks += 1
            await asyncio.sleep(0.01)

    async def main() -> None:
        await asyncio.gather(intake.request(call()), intake.request(call()), ticker())

    try:
        asyncio.run(main())
    finally:
        del model.encode
    assert ticks >= 25  # the loop kept running while two prompts tokenized
    assert len(threads) == 1 and next(iter(threads)).startswith("rap-tokenizer")


def test_a_prompt_too_long_for_any_tokenization_is_refused_without_tokenizing(model) -> None:
    engine = Engine(model, CONFIG, roomy(model), None)
    intake = Intake(model, engine, "m")
    assert intake.max_prompt_chars == engine.context_len * longest_token_chars(model.tokenizer)
    model.encode = lambda *a, **k: pytest.fail("tokenized a prompt that cannot fit")
    try:
        with pytest.raises(EngineError, match="more than the model's context") as exc:
            asyncio.run(intake.request(call(prompt="x" * (intake.max_prompt_chars + 1))))
    finally:
        del model.encode
    assert exc.value.status == 400 and exc.value.reason == "context_length"


def test_chat_without_max_tokens_may_use_the_context_and_unknown_models_are_404(model) -> None:
    engine = Engine(model, CONFIG, roomy(model), None)
    intake = Intake(model, engine, "m")
    messages = [{"role": "user", "content": "a b"}]
    request = asyncio.run(intake.request(call(prompt="", messages=messages, max_tokens=None)))
    row_tokens = engine.sizing.row_tokens(engine.scheduler.pool)
    assert request.max_tokens == row_tokens - len(request.prompt_ids)
    assert row_tokens <= engine.context_len
    engine.config = engine.config.model_copy(update={"default_max_tokens": 5})
    request = asyncio.run(intake.request(call(prompt="", messages=messages, max_tokens=None)))
    assert request.max_tokens == 5
    with pytest.raises(EngineError) as exc:
        asyncio.run(intake.request(call(model="other")))
    assert exc.value.status == 404 and exc.value.reason == "unknown_model"
    with pytest.raises(EngineError) as exc:
        asyncio.run(intake.request(call(max_tokens=0)))
    assert exc.value.status == 400


def test_ignore_eos_reaches_the_engine_request(model) -> None:
    """vLLM's `ignore_eos` extension, for benchmarks that need equal work everywhere."""
    from rap.serving.openai_api import CompletionRequest

    engine = Engine(model, CONFIG, roomy(model), None)
    intake = Intake(model, engine, "m")
    assert asyncio.run(intake.request(call(ignore_eos=True))).ignore_eos
    assert not asyncio.run(intake.request(call())).ignore_eos
    assert CompletionRequest(model="m", prompt="a", ignore_eos=True).ignore_eos


def test_text_the_tokenizer_cannot_take_is_a_400_before_tokenizing(model) -> None:
    """A lone surrogate reached the tokenizer, which raised TypeError out of `generate`; the
    router read that as a dead replica (a 503, and the replica marked failed)."""
    engine = Engine(model, CONFIG, roomy(model), None)
    intake = Intake(model, engine, "m")
    model.encode = lambda *a, **k: pytest.fail("tokenized text it cannot take")
    lone = "a\ud800"
    cases = [
        (call(prompt=lone), "prompt holds an unpaired UTF-16 surrogate"),
        (call(prompt="", messages=[{"role": "user", "content": lone}]), "messages[0].content"),
        (call(stop=["ok", lone]), "stop[1] holds an unpaired"),
        (call(stop=["x" * 257]), "stop[0] has 257 characters"),
    ]
    try:
        for bad, named in cases:
            with pytest.raises(EngineError) as exc:
                asyncio.run(intake.request(bad))
            assert exc.value.status == 400 and named in exc.value.message
    finally:
        del model.encode
    assert not engine.scheduler.waiting
