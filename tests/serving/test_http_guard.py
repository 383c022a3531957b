"""The ingress's checks before any parsing (rap.serving.http_guard), driven as raw ASGI calls on
a FastAPI app shaped like the router's: credentials before the body, a size ceiling, a rate
limit, and OpenAI's error shape for everything that goes wrong."""

from __future__ import annotations

import asyncio
import ipaddress
import json
from typing import Any

import pytest
from fastapi import FastAPI

from rap.serving.http_guard import (
    Guard,
    HttpConfig,
    TokenBucket,
    client_address,
    install,
    request_timeout_s,
)
from rap.serving.openai_api import CompletionRequest, HTTPError

KEY = "sk-test"


def make_app(**config: Any) -> tuple[FastAPI, list[Any]]:
    app = FastAPI(docs_url=None, redoc_url=None)
    seen: list[Any] = []

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest) -> dict[str, Any]:
        seen.append(body)
        return {"ok": True}

    guard = Guard(HttpConfig(**config), api_key=KEY, admin_token="adm")
    install(app, guard)
    return app, seen


def call(
    app: FastAPI,
    path: str,
    chunks: list[bytes],
    headers: dict[str, str] | None = None,
    method: str = "POST",
    client: str = "10.0.0.1",
) -> tuple[int, dict[str, str], Any, int]:
    """(status, headers, JSON body, chunks the app read) of one request."""
    sent = iter([*chunks])
    read = 0

    async def receive() -> dict[str, Any]:
        nonlocal read
        try:
            chunk = next(sent)
        except StopIteration:
            await asyncio.sleep(3600)  # nothing more: the client waits for the answer
        read += 1
        return {"type": "http.request", "body": chunk, "more_body": read < len(chunks)}

    out: dict[str, Any] = {"body": b""}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            out["status"] = message["status"]
            out["headers"] = {k.decode(): v.decode() for k, v in message["headers"]}
        else:
            out["body"] += message.get("body", b"")

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
        "client": (client, 1234),
        "server": ("127.0.0.1", 8000),
    }
    asyncio.run(asyncio.wait_for(app(scope, receive, send), 10))
    return out["status"], out["headers"], json.loads(out["body"]), read


AUTH = {"authorization": f"Bearer {KEY}", "content-type": "application/json"}
GOOD = json.dumps({"model": "m", "prompt": "hi"}).encode()


def openai_error(body: Any) -> dict[str, Any]:
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return dict(body["error"])


def test_a_client_without_the_key_gets_401_before_the_body_is_read() -> None:
    """It made the ingress parse any body and got validation details instead."""
    app, seen = make_app()
    status, _, body, read = call(app, "/v1/completions", [b"{not json"], {})
    assert status == 401 and read == 0 and not seen
    assert openai_error(body)["code"] == "invalid_api_key"
    status, _, body, _ = call(app, "/v1/completions", [GOOD], AUTH)
    assert status == 200 and body == {"ok": True} and len(seen) == 1


def test_admin_paths_need_the_admin_token_not_the_api_key() -> None:
    app, _ = make_app()
    status, _, body, read = call(app, "/admin/state", [b""], AUTH, method="GET")
    assert status == 401 and read == 0 and openai_error(body)["code"] == "invalid_admin_token"


def test_bodies_over_the_limit_are_413_declared_or_streamed() -> None:
    app, seen = make_app(max_body_bytes=4096)
    big = {**AUTH, "content-length": "5000"}
    status, _, body, read = call(app, "/v1/completions", [b"x" * 5000], big)
    assert status == 413 and read == 0  # refused unread
    assert openai_error(body)["code"] == "body_too_large"
    chunks = [b" " * 1000] * 6  # chunked: no declared length
    status, _, _, read = call(app, "/v1/completions", chunks, AUTH)
    assert status == 413 and read == 5 and not seen  # cut off once past 4,096 bytes


@pytest.mark.parametrize(
    "raw",
    [b"{not json", b"[1, 2]", b'"text"', b"null", b"[" * 100_000, b'{"model": ' + b"[" * 50_000],
    ids=["not-json", "array", "string", "null", "deep-array", "deep-field"],
)
def test_every_malformed_body_is_a_400_in_openais_shape(raw: bytes) -> None:
    app, seen = make_app()
    status, _, body, _ = call(app, "/v1/completions", [raw], AUTH)
    assert status == 400 and not seen
    assert openai_error(body)["type"] == "invalid_request_error"


def test_unknown_paths_and_methods_answer_in_openais_shape() -> None:
    app, _ = make_app()
    status, _, body, _ = call(app, "/v1/nothing", [b""], AUTH)
    assert status == 404 and openai_error(body)
    status, _, body, _ = call(app, "/v1/completions", [b""], AUTH, method="GET")
    assert status == 405 and openai_error(body)
    status, _, body, _ = call(app, "/docs", [b""], AUTH, method="GET")
    assert status == 404  # /docs is not served


def test_unsupported_openai_fields_are_a_400_naming_them() -> None:
    app, seen = make_app()
    for field, value in [("logprobs", 2), ("echo", True), ("logit_bias", {"1": 5})]:
        raw = json.dumps({"model": "m", "prompt": "hi", field: value}).encode()
        status, _, body, _ = call(app, "/v1/completions", [raw], AUTH)
        assert status == 400 and field in openai_error(body)["message"]
    assert not seen


def test_the_rate_limit_is_per_api_key_with_retry_after() -> None:
    """With a key set, the key is the client: another address holding it shares its bucket."""
    app, _ = make_app(rate_limit_rps=0.5, rate_limit_burst=2)
    answers = [call(app, "/v1/completions", [GOOD], AUTH)[0] for _ in range(3)]
    assert answers == [200, 200, 429]
    status, headers, body, _ = call(app, "/v1/completions", [GOOD], AUTH)
    assert status == 429 and int(headers["retry-after"]) >= 1
    assert openai_error(body)["code"] == "rate_limit_exceeded"
    assert call(app, "/v1/completions", [GOOD], AUTH, client="10.0.0.2")[0] == 429


def scope_of(client: str, headers: dict[str, str] | list[tuple[str, str]]) -> dict[str, Any]:
    pairs = headers.items() if isinstance(headers, dict) else headers
    return {
        "type": "http",
        "path": "/v1/completions",
        "headers": [(k.lower().encode(), v.encode()) for k, v in pairs],
        "client": (client, 1234),
    }


def refused(guard: Guard, scope: dict[str, Any]) -> bool:
    """Whether the guard answers the request 429 (a fixed clock: no bucket refills)."""
    try:
        guard.check(scope, now_s=0.0)
    except HTTPError as exc:
        assert exc.status == 429, exc.message
        return True
    return False


def test_rotating_the_authorization_header_does_not_evade_the_limit() -> None:
    """With no key set, each header value had a bucket of its own: 5,000 headers, 0 refused."""
    guard = Guard(HttpConfig(rate_limit_rps=1.0, rate_limit_burst=20))
    answers = [
        refused(guard, scope_of("198.51.100.7", {"authorization": f"Bearer rotated-{i}"}))
        for i in range(5000)
    ]
    assert not any(answers[:20]) and all(answers[20:])  # the burst, then 4,980 refused
    assert len(guard.buckets) == 1
    assert not refused(guard, scope_of("198.51.100.8", {}))  # another address: its own bucket


def test_the_key_bucket_is_named_by_a_hash_not_the_key() -> None:
    guard = Guard(HttpConfig(rate_limit_rps=1.0), api_key=KEY)
    assert not refused(guard, scope_of("10.0.0.1", AUTH))
    (name,) = guard.buckets
    assert name.startswith("key:") and KEY not in name


def test_x_forwarded_for_is_believed_only_from_a_configured_proxy() -> None:
    """Behind a proxy every client shared the proxy's bucket; and a header from anyone else
    must not let a client pick its address."""
    guard = Guard(
        HttpConfig(rate_limit_rps=1.0, rate_limit_burst=1, trusted_proxies=["10.0.0.0/8"])
    )
    for i in range(5):  # through the proxy: one bucket per forwarded client
        assert not refused(guard, scope_of("10.0.0.1", {"x-forwarded-for": f"203.0.113.{i}"}))
    assert refused(guard, scope_of("10.0.0.1", {"x-forwarded-for": "203.0.113.0"}))
    unlisted = [
        refused(guard, scope_of("198.51.100.7", {"x-forwarded-for": f"192.0.2.{i}"}))
        for i in range(5)
    ]
    assert unlisted == [False, True, True, True, True]  # the header ignored: the peer's bucket
    assert "address:198.51.100.7" in guard.buckets


def test_the_client_is_the_right_most_hop_that_is_not_a_trusted_proxy() -> None:
    trusted = [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8")]
    forwarded = [("x-forwarded-for", "1.2.3.4, 203.0.113.9"), ("x-forwarded-for", "10.0.0.2")]
    assert client_address(scope_of("10.0.0.1", forwarded), trusted) == "203.0.113.9"
    assert client_address(scope_of("::ffff:10.0.0.1", forwarded), trusted) == "203.0.113.9"
    assert client_address(scope_of("fd00::1", forwarded), trusted) == "203.0.113.9"
    assert client_address(scope_of("203.0.113.5", forwarded), trusted) == "203.0.113.5"
    assert client_address(scope_of("10.0.0.1", forwarded), []) == "10.0.0.1"
    all_proxies = [("x-forwarded-for", "10.1.1.1, 10.2.2.2")]
    assert client_address(scope_of("10.0.0.1", all_proxies), trusted) == "10.1.1.1"
    assert client_address(scope_of("10.0.0.1", {}), trusted) == "10.0.0.1"


def test_the_bucket_table_is_bounded_least_recently_used_evicted() -> None:
    assert HttpConfig().max_rate_buckets == 10_000
    guard = Guard(HttpConfig(rate_limit_rps=1.0, rate_limit_burst=1, max_rate_buckets=100))
    regular = scope_of("192.0.2.1", {})
    assert not refused(guard, regular)
    for i in range(5000):
        refused(guard, scope_of(f"198.51.{i // 256}.{i % 256}", {}))
        if i % 50 == 0:
            assert refused(guard, regular)  # seen recently: kept, and still empty
        assert len(guard.buckets) <= 100
    assert "address:198.51.0.0" not in guard.buckets  # the oldest went first


def test_a_misspelt_or_malformed_proxy_setting_is_refused() -> None:
    with pytest.raises(ValueError, match="not an IP address or network"):
        HttpConfig(trusted_proxies=["proxy.internal"])
    with pytest.raises(ValueError, match="trusted_proxy"):
        HttpConfig(trusted_proxy=["10.0.0.1"])  # type: ignore[call-arg]


def test_token_bucket_refills_at_its_rate() -> None:
    bucket = TokenBucket(rate=2.0, burst=1)
    assert bucket.take(0.0) == 0.0
    assert bucket.take(0.0) == pytest.approx(0.5)
    assert bucket.take(0.5) == 0.0


def test_request_deadlines_come_from_the_header_within_the_configured_one() -> None:
    config = HttpConfig(request_timeout_s=60)
    assert request_timeout_s(None, config) == 60
    assert request_timeout_s("5", config) == 5
    assert request_timeout_s("600", config) == 60
    for bad in ("soon", "-1", "inf", "nan"):
        with pytest.raises(HTTPError) as exc:
            request_timeout_s(bad, config)
        assert exc.value.status == 400
