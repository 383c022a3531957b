"""OpenAI-compatible requests (the subset RAP Serve implements), credentials and error bodies.

Requests are validated here; anything unsupported is refused with a 400 that names the field,
never ignored silently. Errors follow OpenAI's body `{"error": {message, type, param, code}}`;
the responses themselves are built from a replica's events in `rap.serving.openai_relay`.
"""

from __future__ import annotations

import hmac
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
