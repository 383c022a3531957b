"""OpenAI-compatible request and response shapes (the subset RAP Serve implements).

Requests are validated here; anything unsupported is refused with a 400 that names the field,
never ignored silently. Responses follow OpenAI's `text_completion` and `chat.completion`
objects, their streamed chunks, and the error body `{"error": {message, type, param, code}}`.
"""

from __future__ import annotations

import hmac
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from rap.serving.request_text import MAX_STOP_CHARS, MAX_STOP_STRINGS, checked_text, stop_problem

MAX_TOKENS_LIMIT = 4096


class _Request(BaseModel):
    """Fields every request shares. Unknown fields are ignored, as OpenAI's own clients send
    new ones; the known ones this server does not implement are refused (`_refuse_unsupported`),
    never silently dropped."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=1, description="Only one choice per request.")
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    seed: int | None = Field(
        None, ge=0, lt=2**63, description="Same seed, prompt and mask, run alone: same output."
    )
    user: str | None = None
    stop: str | list[str] | None = Field(
        None,
        description=f"Up to {MAX_STOP_STRINGS} sequences of at most {MAX_STOP_CHARS} characters "
        "where generation stops (not returned).",
    )
    min_kept_fraction: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="RAP extension: serve this request only under masks keeping at least this "
        "share of the blocks (1.0: the dense model only); it waits, or gets a 503, rather than "
        "run below it.",
    )
    ignore_eos: bool = Field(
        False,
        description="Extension (vLLM's name): generate max_tokens whatever the model says, "
        "end-of-sequence included; benchmarks use it so every system does equal work.",
    )
    # Known OpenAI fields this server does not implement: accepted only at their neutral value.
    logprobs: bool | int | None = None
    top_logprobs: int | None = None
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    functions: list[Any] | None = None
    function_call: str | dict[str, Any] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    @field_validator("stop")
    @classmethod
    def _bounded_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        problem = stop_problem([value] if isinstance(value, str) else value or [])
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("model", "user")
    @classmethod
    def _valid_unicode(cls, value: str | None, info: ValidationInfo) -> str | None:
        return value if value is None else checked_text(str(info.field_name), value)

    @model_validator(mode="after")
    def _refuse_unsupported(self) -> _Request:
        neutral = {
            "logprobs": lambda v: not v,
            "top_logprobs": lambda v: not v,
            "echo": lambda v: not v,
            "best_of": lambda v: v in (None, 1),
            "suffix": lambda v: not v,
            "response_format": lambda v: v is None or v.get("type") == "text",
            "tools": lambda v: not v,
            "tool_choice": lambda v: v in (None, "none", "auto"),
            "functions": lambda v: not v,
            "function_call": lambda v: v in (None, "none", "auto"),
            "presence_penalty": lambda v: not v,
            "frequency_penalty": lambda v: not v,
            "logit_bias": lambda v: not v,
        }
        for name, ok in neutral.items():
            if not ok(getattr(self, name)):
                raise ValueError(
                    f"{name} is not supported by this server (got {getattr(self, name)!r}); "
                    "leave it out"
                )
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(_Request):
    prompt: str | list[str] = Field(description="One prompt (a list holding one string is fine).")

    @field_validator("prompt")
    @classmethod
    def _valid_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, str):
            return checked_text("prompt", value)
        for i, text in enumerate(value):
            checked_text(f"prompt[{i}]", text)
        return value

    def prompt_text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) != 1:
            raise ValueError("prompt: exactly one prompt per request is supported")
        return self.prompt[0]

    def max_new_tokens(self) -> int:
        """OpenAI's default for completions is 16."""
        return self.max_tokens or 16


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"] = Field(description="Only text parts: images and audio are refused.")
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart] = Field(description="A string, or a list of text parts.")

    @field_validator("content", mode="after")
    @classmethod
    def _join_parts(cls, value: str | list[TextPart]) -> str:
        """Text parts are joined with a newline (as vLLM does)."""
        if isinstance(value, str):
            return checked_text("content", value)
        for k, part in enumerate(value):
            checked_text(f"content[{k}].text", part.text)
        return "\n".join(p.text for p in value)


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)

    def max_new_tokens(self) -> int | None:
        """None: up to the context (OpenAI's default for chat); the replica resolves it."""
        return self.max_completion_tokens or self.max_tokens


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


@dataclass
class HTTPError(Exception):
    """An answer other than 200, in OpenAI's error shape (the ingress turns it into a response)."""

    status: int
    message: str
    type: str = "invalid_request_error"
    headers: dict[str, str] | None = None
    code: str | None = None
    """OpenAI's machine-readable code: invalid_api_key, model_not_found, ..."""


def validation_error_body(errors: Any) -> dict:
    """OpenAI's 400 body for a request that failed validation (FastAPI would answer 422 with
    its own shape): the first error, naming the field (`messages[0].content`)."""
    first = errors[0]
    path = "".join(
        f"[{p}]" if isinstance(p, int) else f".{p}" for p in first["loc"] if p != "body"
    ).lstrip(".")
    message = str(first["msg"]).removeprefix("Value error, ")  # pydantic's, for a ValueError
    return error_body(f"{path or 'body'}: {message}", "invalid_request_error", path or None)


def bearer_token(authorization: str) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, else None."""
    return authorization[7:] if authorization.lower().startswith("bearer ") else None


def check_api_key(expected: str | None, authorization: str) -> None:
    """401 unless no key is configured or the header carries it (compared in constant time)."""
    token = bearer_token(authorization)
    if expected is not None and not (token and hmac.compare_digest(token, expected)):
        raise HTTPError(
            401,
            "Incorrect or missing API key (Authorization: Bearer <key>)",
            code="invalid_api_key",
        )


def check_admin_token(expected: str | None, authorization: str) -> None:
    """403 when no admin token is configured (admin off); 401 unless the header carries it."""
    if expected is None:
        raise HTTPError(
            403,
            "admin endpoints are off: set the admin token's environment "
            "variable (RAP_ADMIN_TOKEN by default) to enable them",
        )
    token = bearer_token(authorization)
    if not (token and hmac.compare_digest(token, expected)):
        raise HTTPError(401, "incorrect or missing admin token", code="invalid_admin_token")


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_body(
    rid: str, model: str, text: str, finish: str, fingerprint: str, use: dict, chat: bool
) -> dict:
    """A whole (non-streamed) completion or chat completion."""
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    return {
        "id": rid,
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": fingerprint,
        "choices": [choice],
        "usage": use,
    }


def chunk_body(
    rid: str,
    model: str,
    text: str | None,
    finish: str | None,
    fingerprint: str,
    chat: bool,
    first: bool = False,
    use: dict | None = None,
    usage_field: bool = False,
) -> dict:
    """One streamed chunk; with `use` and no text, the final usage-only chunk (no choices).
    With `usage_field` (the client asked for usage) every other chunk carries `usage: null`,
    as OpenAI's do. A chat chunk's delta: role and content on the first, content after, `{}`
    on the one that finishes."""
    choices: list[dict[str, Any]] = []
    if use is None or text is not None:
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
        if chat:
            delta: dict[str, Any] = {"content": text or ""}
            if first:
                delta["role"] = "assistant"
            choice["delta"] = delta if finish is None or text else {}
        else:
            choice["text"] = text or ""
        choices.append(choice)
    body: dict[str, Any] = {
        "id": rid,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": fingerprint,
        "choices": choices,
    }
    if use is not None or usage_field:
        body["usage"] = use
    return body


def event_error_body(event: dict[str, Any]) -> dict:
    """OpenAI's error body for a replica's error event (4xx: the request; 5xx: the server)."""
    status = int(event.get("status", 500))
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return error_body(event["message"], kind, code=event.get("code"))


def sse(data: dict[str, Any] | str) -> str:
    """One server-sent event line pair."""

    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


class Relay:
    """Turns a replica's events (start, token..., done | error) into OpenAI bodies."""

    def __init__(self, model: str, chat: bool, include_usage: bool = False) -> None:
        self.model = model
        self.chat = chat
        self.include_usage = include_usage
        self.served: dict[str, Any] = {}
        """RAP's account of the mask that served the request (`rap` in the final body)."""
        self.rid = new_id("chatcmpl" if chat else "cmpl")
        self.fingerprint = ""
        self.prompt_tokens = 0

    def started(self, event: dict[str, Any]) -> None:
        self.fingerprint = event["fingerprint"]
        self.prompt_tokens = event["prompt_tokens"]

    def _ended(self, event: dict[str, Any]) -> None:
        """The mask the row was served under (the smallest it ran under: its fingerprint and its
        dropped blocks, `a3,m10`), how often it shrank under the request, and the planner's
        predicted Δ ln perplexity of it (an estimate)."""
        self.fingerprint = event.get("fingerprint", self.fingerprint)
        self.served = {
            "mask": self.fingerprint,
            "mask_key": event.get("mask_key"),
            "mask_changes": event.get("mask_changes", 0),
            "predicted_delta_lnppl": event.get("predicted_delta_lnppl"),
        }

    async def whole(self, events: Any) -> tuple[int, dict[str, Any]]:
        """Collect every event into one response: (status, body)."""
        parts: list[str] = []
        async for event in events:
            if event["type"] == "token":
                parts.append(event["text"])
            elif event["type"] == "error":
                return event["status"], event_error_body(event)
            elif event["type"] == "done":
                self._ended(event)
                use = usage(self.prompt_tokens, event["completion_tokens"])
                body = completion_body(
                    self.rid,
                    self.model,
                    "".join(parts),
                    event["finish_reason"],
                    self.fingerprint,
                    use,
                    self.chat,
                )
                return 200, {**body, "rap": self.served}
        return 500, error_body("the replica ended the stream without finishing", "server_error")

    async def stream(self, events: Any) -> Any:
        """Server-sent events: a chunk per token, the finish, usage if asked, then [DONE]."""
        first = True
        async for event in events:
            if event["type"] == "token":
                yield sse(
                    chunk_body(
                        self.rid,
                        self.model,
                        event["text"],
                        None,
                        self.fingerprint,
                        self.chat,
                        first=first,
                        usage_field=self.include_usage,
                    )
                )
                first = False
            elif event["type"] == "error":
                yield sse(event_error_body(event))
                break
            elif event["type"] == "done":  # the mask the row ended under, changes counted
                self._ended(event)
                final = chunk_body(
                    self.rid,
                    self.model,
                    "",
                    event["finish_reason"],
                    self.fingerprint,
                    self.chat,
                    first=first,
                    usage_field=self.include_usage,
                )
                yield sse({**final, "rap": self.served})
                if self.include_usage:
                    use = usage(self.prompt_tokens, event["completion_tokens"])
                    yield sse(
                        chunk_body(
                            self.rid, self.model, None, None, self.fingerprint, self.chat, use=use
                        )
                    )
                break
        yield sse("[DONE]")
