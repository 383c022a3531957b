"""What the ingress checks before it parses anything: size, credentials and rate.

`GuardMiddleware` is a plain ASGI middleware in front of the router's FastAPI app:

1. credentials first — `/v1/*` and `/openapi.json` need the API key when one is set, `/admin/*`
   the admin token (403 when admin is off) — so an unauthenticated client never makes the
   ingress read, parse or validate a body;
2. a per-client rate limit (a token bucket per client address and API key): 429 with
   Retry-After;
3. the body read with a ceiling: a declared `Content-Length` above `max_body_bytes` is refused
   unread and a chunked body is cut off when it crosses it (413).

`install` adds it with exception handlers that give every error — Starlette's 404/405, a body
FastAPI cannot parse (not JSON, nested past the parser's recursion limit), an unexpected
exception — OpenAI's error shape instead of FastAPI's `{"detail": ...}`.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from rap.serving.openai_api import (
    HTTPError,
    check_admin_token,
    check_api_key,
    error_body,
    validation_error_body,
)

log = logging.getLogger("rap.serving.http")

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class HttpConfig(BaseModel):
    """Limits the ingress enforces before a request reaches a replica."""

    max_body_bytes: int = Field(
        1 << 20, ge=1024, description="Largest request body (bytes); larger is a 413, unread."
    )
    max_messages: int = Field(256, ge=1, description="Most chat messages in one request.")
    rate_limit_rps: float | None = Field(
        None, gt=0, description="Requests per second per client (address and API key); None: off."
    )
    rate_limit_burst: int = Field(20, ge=1, description="Requests a client may send at once.")
    request_timeout_s: float = Field(
        600.0, gt=0, description="Deadline of a request unless it asks for less: work stops then."
    )


@dataclass
class TokenBucket:
    """`rate` tokens a second up to `burst`; a request takes one."""

    rate: float
    burst: int
    tokens: float = -1.0
    at_s: float = 0.0

    def take(self, now_s: float) -> float:
        """0 if a token was taken, else the seconds until one will be there."""
        if self.tokens < 0:
            self.tokens, self.at_s = float(self.burst), now_s
        self.tokens = min(self.burst, self.tokens + (now_s - self.at_s) * self.rate)
        self.at_s = now_s
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


@dataclass
class Guard:
    """The settings the middleware enforces; the router fills them in when it starts."""

    config: HttpConfig = field(default_factory=HttpConfig)
    api_key: str | None = None
    admin_token: str | None = None
    buckets: dict[str, TokenBucket] = field(default_factory=dict)

    def check(self, scope: Scope, now_s: float) -> None:
        """Raise the HTTPError a request gets before its body is read, if any."""
        path, root = scope.get("path", ""), scope.get("root_path", "")
        if root and path.startswith(root):  # an app mounted under a prefix (Serve's route_prefix)
            path = path[len(root) :]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        auth = headers.get("authorization", "")
        if path.startswith("/admin/"):
            check_admin_token(self.admin_token, auth)
        elif path.startswith("/v1/") or path == "/openapi.json":
            check_api_key(self.api_key, auth)
            self._rate(f"{_client(scope)} {auth}", now_s)
        declared = headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self._limit):
            raise self.too_large()

    def _rate(self, who: str, now_s: float) -> None:
        c = self.config
        if c.rate_limit_rps is None:
            return
        bucket = self.buckets.setdefault(who, TokenBucket(c.rate_limit_rps, c.rate_limit_burst))
        wait_s = bucket.take(now_s)
        if wait_s > 0:
            raise HTTPError(
                429,
                f"Rate limit reached: {c.rate_limit_rps:g} requests/s, bursts of "
                f"{c.rate_limit_burst}; retry in {wait_s:.1f} s",
                "requests",
                {"Retry-After": str(math.ceil(wait_s))},
                code="rate_limit_exceeded",
            )

    @property
    def _limit(self) -> int:
        return self.config.max_body_bytes

    def too_large(self) -> HTTPError:
        return HTTPError(
            413, f"The request body is larger than {self._limit:,} bytes", code="body_too_large"
        )


def request_timeout_s(header: str | None, config: HttpConfig) -> float:
    """A request's deadline in seconds: its `X-Request-Timeout` header within the configured
    `request_timeout_s` (which is also the default); 400 for anything but positive seconds."""
    if header is None:
        return config.request_timeout_s
    try:
        asked = float(header)
    except ValueError:
        raise HTTPError(400, f"X-Request-Timeout must be seconds, got {header!r}") from None
    if not 0 < asked < math.inf:
        raise HTTPError(400, f"X-Request-Timeout must be positive and finite, got {header!r}")
    return min(asked, config.request_timeout_s)


def _client(scope: Scope) -> str:
    client = scope.get("client") or ("unknown", 0)
    return f"address:{client[0]}"


class GuardMiddleware:
    """ASGI middleware enforcing a `Guard` (module doc)."""

    def __init__(self, app: ASGIApp, guard: Guard) -> None:
        self.app, self.guard = app, guard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            self.guard.check(scope, time.monotonic())
            body = await self._read(receive)
        except HTTPError as exc:
            await _send_error(send, exc)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: disconnect notices, as Starlette expects

        await self.app(scope, replay, send)

    async def _read(self, receive: Receive) -> bytes:
        """The whole body, or a 413 as soon as it crosses the limit."""
        parts, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise HTTPError(400, "the client went away while sending the body")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.guard.config.max_body_bytes:
                raise self.guard.too_large()
            parts.append(chunk)
            if not message.get("more_body", False):
                return b"".join(parts)


async def _send_error(send: Send, exc: HTTPError) -> None:
    payload = json.dumps(error_body(exc.message, exc.type, code=exc.code)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(payload))]
    headers += [(k.lower().encode(), v.encode()) for k, v in (exc.headers or {}).items()]
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


def install(app: Any, guard: Guard) -> None:
    """Put the guard in front of a FastAPI app and give every error OpenAI's shape."""

    async def http_error(_: Any, exc: HTTPError) -> JSONResponse:
        body = error_body(exc.message, exc.type, code=exc.code)
        return JSONResponse(body, exc.status, headers=exc.headers)

    async def invalid(_: Any, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(validation_error_body(exc.errors()), 400)

    async def starlette_error(_: Any, exc: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(error_body(str(exc.detail), kind), exc.status_code, exc.headers)

    async def unexpected(_: Any, exc: Exception) -> JSONResponse:
        log.exception("unhandled error in the ingress")
        return JSONResponse(
            error_body(f"internal error: {type(exc).__name__}", "server_error"), 500
        )

    app.add_exception_handler(HTTPError, http_error)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(StarletteHTTPException, starlette_error)
    app.add_exception_handler(Exception, unexpected)
    app.add_middleware(GuardMiddleware, guard=guard)
