"""Per-request token streams out of a batched `generate()` running in a worker thread.

transformers' `TextStreamer` takes batch size 1 only; `RowStreamer` splits each step's tokens by
row and hands them to that request's `RowState`, which decodes the new text and puts events on
the request's asyncio queue from the worker thread (`call_soon_threadsafe`). A row ends at its
own end-of-sequence token, stop string or `max_tokens`; `StopWhenRowsDone` tells `generate()`
which rows are done, so the batch stops when all are.
"""

from __future__ import annotations

import asyncio
from typing import Any

import torch
from transformers import StoppingCriteria


class RowState:
    """One request's progress inside a batch: its tokens, text sent, and whether it is done."""

    def __init__(
        self,
        request: Any,
        queue: asyncio.Queue,
        loop: asyncio.AbstractEventLoop,
        model: Any,
        stats: Any,
    ) -> None:
        self.request = request
        self.queue = queue
        self.loop = loop
        self.model = model
        self.stats = stats
        eos = getattr(model.config, "eos_token_id", None)
        self.eos = {eos} if isinstance(eos, int) else set(eos or [])
        self.ids: list[int] = []
        self.sent = ""
        self.done = False

    def _put(self, event: dict[str, Any]) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    def start(self, fingerprint: str) -> None:
        self._put(
            {
                "type": "start",
                "fingerprint": fingerprint,
                "prompt_tokens": len(self.request.prompt_ids),
            }
        )

    def on_token(self, token: int) -> None:
        if self.done:
            return
        self.stats.tokens += 1
        if token in self.eos:
            self._end("stop", counted=1)
            return
        self.ids.append(token)
        text = self.model.decode(self.ids)
        cut = min((text.find(s) for s in self.request.stop if s in text), default=-1)
        if cut >= 0:
            self._emit(text[:cut])
            self._end("stop")
        elif not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            self._emit(text)
        if not self.done and len(self.ids) >= self.request.max_tokens:
            self._emit(self.model.decode(self.ids))
            self._end("length")

    def _emit(self, text: str) -> None:
        if len(text) > len(self.sent) and text.startswith(self.sent):
            self._put({"type": "token", "text": text[len(self.sent) :]})
            self.sent = text

    def _end(self, reason: str, counted: int = 0) -> None:
        self.done = True
        self._put(
            {"type": "done", "finish_reason": reason, "completion_tokens": len(self.ids) + counted}
        )

    def finish(self) -> None:
        """After generate() returns: a row still open ran out of steps."""
        if not self.done:
            self._emit(self.model.decode(self.ids))
            self._end("length")

    def fail(self, status: int, message: str) -> None:
        if not self.done:
            self.done = True
            self._put({"type": "error", "status": status, "message": message})


class RowStreamer:
    """A `generate()` streamer: the first call carries the prompts, then one token per row."""

    def __init__(self, rows: list[RowState]) -> None:
        self.rows = rows
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for row, token in zip(
            self.rows, value.reshape(len(self.rows), -1)[:, -1].tolist(), strict=True
        ):
            row.on_token(int(token))

    def end(self) -> None:
        pass


class StopWhenRowsDone(StoppingCriteria):
    """A stopping criterion: a row is finished once its RowState is done."""

    def __init__(self, rows: list[RowState]) -> None:
        self.rows = rows

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        return torch.tensor([r.done for r in self.rows], device=input_ids.device)
