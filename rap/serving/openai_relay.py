"""OpenAI responses from a replica's events: `text_completion` and `chat.completion` objects,
their streamed chunks (server-sent events) and the usage chunk, with RAP's account of the mask
that served the request (`rap` in the final body)."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from rap.serving.openai_api import error_body


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
