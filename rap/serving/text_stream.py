"""A row's text as its tokens arrive, with stop strings that never reach the client.

Text is decoded from all of the row's tokens each time (a tokenizer may merge bytes across
tokens), and only a prefix that can no longer change is sent:

    held back = the longest end of the text that begins some stop string, or an unfinished
                multi-byte character ("\\ufffd")

so a stop string split across two tokens is cut before any of it is sent, streamed or not.
When a stop string completes, the text before it is sent and the row stops.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


class TextStream:
    """Incremental text of one row (module doc)."""

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()) -> None:
        self.decode = decode
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.sent = ""
        self.stopped = False

    def push(self, token: int) -> str:
        """Add a token; the new text that may be sent now ("" while held back)."""
        if self.stopped:
            return ""
        self.ids.append(token)
        text = self.decode(self.ids)
        cuts = [i for i in (text.find(s, max(len(self.sent) - len(s) + 1, 0)) for s in self.stop)]
        found = [i for i in cuts if i >= 0]
        if found:
            self.stopped = True
            return self._send(text[: min(found)])
        return self._send(text[: len(text) - self._held(text)])

    def flush(self) -> str:
        """The row ended without a stop string: everything not sent yet."""
        return "" if self.stopped else self._send(self.decode(self.ids))

    def _held(self, text: str) -> int:
        held = 1 if text.endswith("\ufffd") else 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    held = max(held, k)
                    break
        return held

    def _send(self, text: str) -> str:
        if len(text) > len(self.sent) and text.startswith(self.sent):
            new, self.sent = text[len(self.sent) :], text
            return new
        return ""
