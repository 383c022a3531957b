"""What a row tells its client, step by step: one start, tokens, then exactly one terminal event.

The events stay plain dicts on the wire (they cross to the HTTP layer and between processes as
JSON), typed here so that each kind has one definition and every producer builds it through one
function. The order a client sees: `StartEvent`, `TokenEvent`..., then `DoneEvent` or
`ErrorEvent` (`TERMINAL`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, NotRequired, TypedDict

FinishReason = Literal["stop", "length", "cancelled"]
"""Why a row ended well: its end-of-sequence token or a stop string, `max_tokens`, or a cancel."""

TERMINAL = ("done", "error")
"""The kinds of event that end a row's stream: exactly one of them, last."""


class StartEvent(TypedDict):
    type: Literal["start"]
    prompt_tokens: int
    fingerprint: str
    """The mask the row was admitted under."""


class TokenEvent(TypedDict):
    type: Literal["token"]
    text: str


class DoneEvent(TypedDict):
    type: Literal["done"]
    finish_reason: FinishReason
    completion_tokens: int
    token_ids: list[int]
    fingerprint: NotRequired[str]
    """The smallest mask the row ran under, with how often it shrank."""
    mask_key: NotRequired[str]
    mask_changes: NotRequired[int]
    mask_history: NotRequired[list[tuple[int, str]]]
    predicted_delta_lnppl: NotRequired[float | None]
    """The planner's predicted quality cost of `mask_key` (added as the event is delivered)."""


class ErrorEvent(TypedDict):
    type: Literal["error"]
    status: int
    message: str
    code: NotRequired[str]
    retry_after: NotRequired[int]


StepEvent = StartEvent | TokenEvent | DoneEvent | ErrorEvent
Sink = Callable[[StepEvent], None]


def start_event(prompt_tokens: int, fingerprint: str) -> StartEvent:
    return {"type": "start", "prompt_tokens": prompt_tokens, "fingerprint": fingerprint}


def token_event(text: str) -> TokenEvent:
    return {"type": "token", "text": text}


def error_event(
    status: int, message: str, code: str | None = None, retry_after_s: int | None = None
) -> ErrorEvent:
    """An error a client reads as an HTTP status (`code` and Retry-After when there are)."""
    event: ErrorEvent = {"type": "error", "status": status, "message": message}
    if code is not None:
        event["code"] = code
    if retry_after_s is not None:
        event["retry_after"] = retry_after_s
    return event
