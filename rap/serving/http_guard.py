"""What the ingress checks before it parses anything: size, credentials and rate.

`GuardMiddleware` is a plain ASGI middleware in front of the router's FastAPI app:

1. credentials first — `/v1/*` and `/openapi.json` need the API key when one is set, `/admin/*`
   the admin token (403 when admin is off) — so an unauthenticated client never makes the
   ingress read, parse or validate a body;
2. a per-client rate limit: a token bucket per API key (a hash of it) when a key is set, else
   per client address — the ASGI peer, or the right-most untrusted `X-Forwarded-For` hop when
   the peer is a configured proxy; 429 with Retry-After. The table of buckets is bounded, least
   recently used evicted, so that clients that come and go cannot grow it without end;
3. the body read with a ceiling: a declared `Content-Length` above `max_body_bytes` is refused
   unread and a chunked body is cut off when it crosses it (413).

`install` adds it with exception handlers that give every error — Starlette's 404/405, a body
FastAPI cannot parse (not JSON, nested past the parser's recursion limit), an unexpected
exception — OpenAI's error shape instead of FastAPI's `{"detail": ...}`.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import json
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from rap.serving.openai_api import (
    HTTPError,
    bearer_token,
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
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class HttpConfig(BaseModel):
    """Limits the ingress enforces before a request reaches a replica."""

    # A misspelt field (trusted_proxy) would otherwise be dropped without a word.
    model_config = ConfigDict(extra="forbid")

    max_body_bytes: int = Field(
        1 << 20, ge=1024, description="Largest request body (bytes); larger is a 413, unread."
    )
    max_messages: int = Field(256, ge=1, description="Most chat messages in one request.")
    rate_limit_rps: float | None = Field(
        None,
        gt=0,
        description="Requests per second per client (the API key when one is set, else the "
        "client address); None: off.",
    )
    rate_limit_burst: int = Field(20, ge=1, description="Requests a client may send at once.")
    max_rate_buckets: int = Field(
        10_000,
        ge=1,
        description="Most clients the rate limiter remembers; past it the least recently seen "
        "is forgotten (and starts again with a full burst).",
    )
    trusted_proxies: list[str] = Field(
        default_factory=list,
        description="Addresses or networks (CIDR, e.g. 10.0.0.0/8) of the reverse proxies in "
        "front of the ingress: only from them is X-Forwarded-For believed, and the client is "
        "its right-most hop that is not one of them. Empty: the header is ignored.",
    )
    request_timeout_s: float = Field(
        600.0, gt=0, description="Deadline of a request unless it asks for less: work stops then."
    )

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for entry in value:
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ValueError(
                    f"trusted_proxies: {entry!r} is not an IP address or network; expected "
                    "e.g. 10.0.0.7, 10.0.0.0/8 or fd00::/8"
                ) from None
        return value


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
    buckets: OrderedDict[str, TokenBucket] = field(default_factory=OrderedDict)

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
            self._rate(self.rate_key(scope, auth), now_s)
        declared = headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self._limit):
            raise self.too_large()

    def rate_key(self, scope: Scope, authorization: str) -> str:
        """Whose bucket a request takes from: the key's identity once it has been checked (a
        hash, so that the table holds no secret), else the client's address — never a header
        the client may vary at will."""
        token = bearer_token(authorization) if self.api_key is not None else None
        if token is not None:
            return "key:" + hashlib.sha256(token.encode()).hexdigest()[:32]
        return "address:" + client_address(scope, _parsed(tuple(self.config.trusted_proxies)))

    def _rate(self, who: str, now_s: float) -> None:
        c = self.config
        if c.rate_limit_rps is None:
            return
        bucket = self.buckets.get(who)
        if bucket is None:
            bucket = self.buckets[who] = TokenBucket(c.rate_limit_rps, c.rate_limit_burst)
            while len(self.buckets) > c.max_rate_buckets:
                self.buckets.popitem(last=False)
        else:
            self.buckets.move_to_end(who)
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


def client_address(scope: Scope, trusted: Sequence[Network]) -> str:
    """The client's address: the ASGI peer, unless the peer is a trusted proxy; then the
    right-most `X-Forwarded-For` hop that is not a trusted proxy (the hops left of it are
    whatever the client wrote), or the left-most hop when every one is trusted."""
    peer = str((scope.get("client") or ("unknown", 0))[0])
    if not trusted or not _trusted(peer, trusted):
        return peer
    hops = [
        hop.strip()
        for name, value in scope["headers"]
        if name.lower() == b"x-forwarded-for"
        for hop in value.decode("latin-1").split(",")
        if hop.strip()
    ]
    for hop in reversed(hops):
        if not _trusted(hop, trusted):
            return _normal(hop)
    return _normal(hops[0]) if hops else peer


def _trusted(address: str, trusted: Sequence[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:  # not an address (a unix socket's peer, a proxy's garbage): untrusted
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:10.0.0.1 is 10.0.0.1 for a 10.0.0.0/8 entry
    return any(ip in network for network in trusted)


def _normal(address: str) -> str:
    """One spelling per address (0:0::1 and ::1 share a bucket)."""
    try:
        return str(ipaddress.ip_address(address))
    except ValueError:
        return address[:64]


@functools.lru_cache(maxsize=8)
def _parsed(entries: tuple[str, ...]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(entry, strict=False) for entry in entries)


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
