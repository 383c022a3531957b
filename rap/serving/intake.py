"""A router call turned into an engine request: validated, bounded, tokenized off the event loop.

The replica's event loop carries every stream and the telemetry reporter, so a long tokenization
there would stall them all (a 6 MB prompt took 4.8 s). Tokenization runs in one worker thread
of its own — one, because a fast tokenizer is not safe to share between threads — after the
checks that need no tokens:

- characters: a prompt longer than `context × the longest token (in characters)` cannot fit
  the context whatever it tokenizes to (every token decodes to at most that many characters),
  so it is a 400 before any work;
- the model name;
- text the tokenizer would raise on (a lone UTF-16 surrogate) and the stop list's bounds, so
  neither reaches the tokenizer thread or the engine (an exception there reads as a dead
  replica to the router).

Then the engine's own check (prompt + max_tokens within the context, the queue not full).
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pydantic import ValidationError

from rap.core.errors import RapError
from rap.serving.engine import EngineError
from rap.serving.request_text import stop_problem, text_problem
from rap.serving.rows import Request
from rap.serving.telemetry import GenerateCall


def longest_token_chars(tokenizer: Any) -> int:
    """The most characters one token of `tokenizer` decodes to (an upper bound: byte-level
    vocabularies spell each byte as one character, and a byte decodes to at most one)."""
    if tokenizer is None:
        return 1  # no text in at all: `encode` refuses it
    vocab = tokenizer.get_vocab()
    return max((len(t) for t in vocab), default=1) + 1


class Intake:
    """Turns `GenerateCall` dicts into `Request`s for one replica's model and engine."""

    def __init__(self, model: Any, engine: Any, served_name: str) -> None:
        self.model, self.engine, self.served_name = model, engine, served_name
        self.max_prompt_chars = engine.context_len * longest_token_chars(model.tokenizer)
        self._tokenizer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rap-tokenizer")

    async def request(self, call: dict[str, Any]) -> Request:
        """The engine request for a call, or `EngineError` with the status to answer."""
        arrived = time.monotonic()
        try:
            req = GenerateCall.model_validate(call)
        except ValidationError as exc:
            raise EngineError(400, f"invalid request: {exc.errors()[0]['msg']}") from None
        if req.model != self.served_name:
            raise EngineError(
                404,
                f"The model `{req.model}` does not exist; this server serves `{self.served_name}`",
                reason="unknown_model",
            )
        self._check_text(req)
        chars = len(req.prompt) + sum(len(m.get("content", "")) for m in req.messages)
        if chars > self.max_prompt_chars:
            raise EngineError(
                400,
                f"the prompt has {chars:,} characters: more than the model's context of "
                f"{self.engine.context_len:,} tokens can hold (at most {self.max_prompt_chars:,})",
                reason="context_length",
            )
        loop = asyncio.get_running_loop()
        try:
            ids = await loop.run_in_executor(
                self._tokenizer, self.model.encode, req.messages or req.prompt, False
            )
        except RapError as exc:
            raise EngineError(400, str(exc)) from None
        max_tokens = req.max_tokens or self._default_max_tokens(len(ids))
        deadline = arrived + req.timeout_s if req.timeout_s is not None else None
        request = Request(
            ids,
            max_tokens,
            req.temperature,
            req.top_p,
            req.stop,
            req.seed,
            deadline_s=deadline,
            min_kept_fraction=req.min_kept_fraction,
            ignore_eos=req.ignore_eos,
        )
        self.engine.check(request)
        return request

    @staticmethod
    def _check_text(req: GenerateCall) -> None:
        """A 400 for text the tokenizer would raise on, or a stop list the stream cannot bound
        (the router refuses both first; this guards every other caller of the replica)."""
        fields = [
            ("prompt", req.prompt),
            *((f"messages[{i}].{k}", v) for i, m in enumerate(req.messages) for k, v in m.items()),
        ]
        for name, text in fields:
            problem = text_problem(text)
            if problem:
                raise EngineError(400, f"invalid request: {name} {problem}")
        problem = stop_problem(req.stop)
        if problem:
            raise EngineError(400, f"invalid request: {problem}")

    def _default_max_tokens(self, prompt_tokens: int) -> int:
        """Up to the context (OpenAI's default for chat) as far as the pool holds one row, or
        the configured default if less: the row ends with finish_reason `length` there."""
        room = max(self.engine.gauges.row_tokens - prompt_tokens, 1)
        return min(room, self.engine.config.default_max_tokens or room)

    def close(self) -> None:
        self._tokenizer.shutdown(wait=False, cancel_futures=True)
