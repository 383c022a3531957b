"""OpenAI shapes the ingress answers with, without Ray or FastAPI."""

from __future__ import annotations

import json

from rap.serving.openai_api import bearer_token, validation_error_body


def test_bearer_token_is_read_case_insensitively_and_only_from_bearer() -> None:
    assert bearer_token("Bearer abc") == "abc" and bearer_token("bearer abc") == "abc"
    assert bearer_token("Basic abc") is None and bearer_token("") is None


def test_validation_errors_become_openai_400_bodies_naming_the_field() -> None:
    body = validation_error_body([{"loc": ("body", "max_tokens"), "msg": "must be >= 1"}])
    assert body["error"]["message"] == "max_tokens: must be >= 1"
    assert body["error"]["param"] == "max_tokens"
    assert body["error"]["type"] == "invalid_request_error"
    assert validation_error_body([{"loc": ("body",), "msg": "bad"}])["error"]["param"] is None


def test_stop_sequences_are_kept_not_dropped() -> None:
    """They were silently dropped for every HTTP request (no `stop` field)."""
    import pytest
    from pydantic import ValidationError

    from rap.serving.openai_api import ChatRequest, CompletionRequest

    one = CompletionRequest.model_validate({"model": "m", "prompt": "x", "stop": "END"})
    assert one.stop_list() == ["END"]
    chat = ChatRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "x"}], "stop": ["a", "b"]}
    )
    assert chat.stop_list() == ["a", "b"]
    with pytest.raises(ValidationError, match="at most 4 stop sequences"):
        CompletionRequest.model_validate({"model": "m", "prompt": "x", "stop": list("abcde")})


def test_keys_and_admin_tokens_are_checked_and_admin_is_off_without_one() -> None:
    import pytest

    from rap.serving.openai_api import HTTPError, check_admin_token, check_api_key

    check_api_key(None, "")  # no key configured: open
    check_api_key("k", "Bearer k")
    for header in ("", "Bearer x", "Basic k"):
        with pytest.raises(HTTPError) as exc:
            check_api_key("k", header)
        assert exc.value.status == 401 and exc.value.code == "invalid_api_key"
    with pytest.raises(HTTPError) as exc:
        check_admin_token(None, "Bearer anything")
    assert exc.value.status == 403 and "admin endpoints are off" in exc.value.message
    check_admin_token("t", "Bearer t")
    with pytest.raises(HTTPError) as exc:
        check_admin_token("t", "Bearer u")
    assert exc.value.status == 401


def test_chat_content_may_be_a_list_of_text_parts_and_images_are_refused() -> None:
    """A list of parts was a 400."""
    import pytest
    from pydantic import ValidationError

    from rap.serving.openai_api import ChatRequest

    parts = [{"type": "text", "text": "Hello"}, {"type": "text", "text": "world"}]
    chat = ChatRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": parts}]}
    )
    assert chat.messages[0].content == "Hello\nworld"
    image = [{"type": "image_url", "image_url": {"url": "http://x"}}]
    with pytest.raises(ValidationError):
        ChatRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": image}]})


def test_known_fields_are_refused_unless_neutral_and_chat_max_tokens_defaults_to_none() -> None:
    """logprobs, echo, response_format, tools, penalties and logit_bias were silently ignored."""
    import pytest
    from pydantic import ValidationError

    from rap.serving.openai_api import ChatRequest, CompletionRequest

    base = {"model": "m", "prompt": "x"}
    for field, value in [
        ("logprobs", 1),
        ("echo", True),
        ("best_of", 2),
        ("suffix", "end"),
        ("response_format", {"type": "json_object"}),
        ("tools", [{"type": "function", "function": {"name": "f"}}]),
        ("presence_penalty", 0.5),
        ("frequency_penalty", -1.0),
        ("logit_bias", {"50256": -100}),
    ]:
        with pytest.raises(ValidationError, match=f"{field} is not supported"):
            CompletionRequest.model_validate({**base, field: value})
    neutral = {"logprobs": None, "echo": False, "presence_penalty": 0, "logit_bias": {}}
    assert CompletionRequest.model_validate({**base, **neutral}).max_new_tokens() == 16
    text = {"type": "text"}
    chat = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    assert ChatRequest.model_validate({**chat, "response_format": text}).max_new_tokens() is None
    with pytest.raises(ValidationError, match="stream_options is only allowed"):
        ChatRequest.model_validate({**chat, "stream_options": {"include_usage": True}})


def test_stream_chunks_follow_openai_final_delta_and_usage() -> None:
    """The final chat chunk's delta carried content; usage chunks lacked `usage: null` before."""
    import asyncio

    from rap.serving.openai_relay import Relay

    async def events():
        yield {"type": "token", "text": "Hi"}
        yield {"type": "done", "finish_reason": "stop", "completion_tokens": 1}

    relay = Relay("m", chat=True, include_usage=True)
    relay.started({"fingerprint": "f", "prompt_tokens": 3})

    async def collect():
        return [line async for line in relay.stream(events())]

    lines = asyncio.run(collect())
    bodies = [json.loads(line[6:]) for line in lines if line != "data: [DONE]\n\n"]
    first, final, usage_only = bodies
    assert first["choices"][0]["delta"] == {"content": "Hi", "role": "assistant"}
    assert first["usage"] is None
    assert final["choices"][0]["delta"] == {} and final["choices"][0]["finish_reason"] == "stop"
    assert usage_only["choices"] == [] and usage_only["usage"]["total_tokens"] == 4


def test_error_codes_are_in_code_and_4xx_events_are_request_errors() -> None:
    from rap.serving.openai_relay import event_error_body

    body = event_error_body({"status": 404, "message": "no", "code": "model_not_found"})
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["code"] == "model_not_found"
    assert event_error_body({"status": 503, "message": "busy"})["error"]["type"] == "server_error"


def test_an_infinite_or_nan_budget_is_a_validation_error_not_a_500() -> None:
    """`{"gib": Infinity}` (valid to Python's JSON parser) reached int(inf) and was a 500."""
    import pytest
    from pydantic import ValidationError

    from rap.serving.messages import BudgetChange

    for raw in ('{"replica": "r", "gib": Infinity}', '{"replica": "r", "gib": NaN}'):
        with pytest.raises(ValidationError):
            BudgetChange.model_validate(json.loads(raw))
    assert BudgetChange.model_validate({"replica": "r", "gib": 0.5}).gib == 0.5


LONE = '"a\\ud800b"'  # valid JSON: half a UTF-16 pair, which Python's parser keeps as is


def test_a_lone_surrogate_in_any_text_field_is_a_400_naming_the_field() -> None:
    """It passed validation, the tokenizer raised on it in the replica, and the router took
    that for a dead replica: a 503."""
    import pytest
    from pydantic import BaseModel, ValidationError

    from rap.serving.openai_api import ChatRequest, CompletionRequest

    def refused(model: type[BaseModel], raw: str) -> dict:
        with pytest.raises(ValidationError) as exc:
            model.model_validate(json.loads(raw))
        return validation_error_body(exc.value.errors())["error"]

    err = refused(CompletionRequest, f'{{"model": "m", "prompt": {LONE}}}')
    assert err["param"] == "prompt" and "unpaired UTF-16 surrogate (\\ud800" in err["message"]
    assert (
        "prompt[0]"
        in refused(CompletionRequest, f'{{"model": "m", "prompt": [{LONE}]}}')["message"]
    )
    err = refused(CompletionRequest, f'{{"model": "m", "prompt": "x", "stop": ["s", {LONE}]}}')
    assert err["param"] == "stop" and err["message"].startswith("stop: stop[1] holds an unpaired")
    user = '{"role": "user", "content": "hi"}'
    err = refused(
        ChatRequest,
        f'{{"model": "m", "messages": [{user}, {{"role": "user", "content": {LONE}}}]}}',
    )
    assert err["param"] == "messages[1].content"
    parts = f'[{{"type": "text", "text": "ok"}}, {{"type": "text", "text": {LONE}}}]'
    err = refused(
        ChatRequest, f'{{"model": "m", "messages": [{{"role": "user", "content": {parts}}}]}}'
    )
    assert err["param"] == "messages[0].content" and "content[1].text holds" in err["message"]
    # a whole pair is one character, and fine
    ok = CompletionRequest.model_validate(json.loads('{"model": "m", "prompt": "\\ud83d\\ude00"}'))
    assert ok.prompt == "\U0001f600"


def test_the_ingress_answers_a_lone_surrogate_with_400_before_the_handler_runs() -> None:
    from tests.serving.test_http_guard import AUTH, call, make_app, openai_error

    app, seen = make_app()
    raw = f'{{"model": "m", "prompt": {LONE}}}'.encode()
    status, _, body, _ = call(app, "/v1/completions", [raw], AUTH)
    assert status == 400 and not seen
    assert openai_error(body)["param"] == "prompt"


def test_stop_is_bounded_to_four_strings_of_256_characters() -> None:
    """A 100 KB stop string was scanned for on every token of the row."""
    import pytest
    from pydantic import ValidationError

    from rap.serving.openai_api import CompletionRequest
    from rap.serving.request_text import MAX_STOP_CHARS

    base = {"model": "m", "prompt": "x"}
    assert CompletionRequest.model_validate({**base, "stop": ["a" * MAX_STOP_CHARS] * 4})
    for stop, named in [("a" * 257, "stop[0] has 257"), (["ok", "b" * 100_000], "stop[1] has")]:
        with pytest.raises(ValidationError) as exc:
            CompletionRequest.model_validate({**base, "stop": stop})
        err = validation_error_body(exc.value.errors())["error"]
        assert err["param"] == "stop" and named in err["message"]
