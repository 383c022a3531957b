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
