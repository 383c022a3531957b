"""OpenAI shapes the ingress answers with, without Ray or FastAPI."""

from __future__ import annotations

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
        assert exc.value.status == 401 and exc.value.type == "invalid_api_key"
    with pytest.raises(HTTPError) as exc:
        check_admin_token(None, "Bearer anything")
    assert exc.value.status == 403 and "admin endpoints are off" in exc.value.message
    check_admin_token("t", "Bearer t")
    with pytest.raises(HTTPError) as exc:
        check_admin_token("t", "Bearer u")
    assert exc.value.status == 401
