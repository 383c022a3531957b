"""A row's text as its tokens arrive, with stop strings that never reach the client.

The step loop pushes every row's token through this on the engine thread, so the work per
token is bounded, whatever the length of the output or of the stop list:

- decoding (as vLLM's and TGI's incremental detokenizers do): a tokenizer may merge bytes
  across tokens and treat a text's first token specially, so ids are decoded as a window, the
  last few ids behind the unsent ones as context, and only the text after the part already
  passed on is new. A text ending in an unfinished multi-byte character ("\\ufffd") keeps that
  character back until it is complete. The window moves up once it is `2 × WINDOW_IDS` long;
- stop strings: only the new text is scanned, after the held-back end of the text before it:

      held back = the longest end of the text that begins some stop string

  (at most `max(len(stop)) - 1` characters), so a stop string split across tokens is cut before
  any of it is sent, streamed or not. When one completes, the text before it is sent and the
  row stops.

`ids_decoded` and `chars_scanned` count that work, so tests can see it does not grow.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

WINDOW_IDS = 8
"""Ids of context kept in front of the unsent text when the decoding window moves."""


class TextStream:
    """Incremental text of one row (module doc)."""

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()) -> None:
        self.decode = decode
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.stopped = False
        self.ids_decoded = 0
        """Ids passed to `decode` so far (a few per token)."""
        self.chars_scanned = 0
        """Characters the stop-string check has looked at so far."""
        self._start = 0  # the window: ids[_start:]
        self._window = ""  # its text at the last token
        self._done = 0  # characters of `_window` passed on to the stop check
        self._held = ""  # passed on, but held back: it may begin a stop string

    def push(self, token: int) -> str:
        """Add a token; the new text that may be sent now ("" while held back)."""
        if self.stopped:
            return ""
        self.ids.append(token)
        new = self._detokenize()
        return self._scan(new) if new else ""

    def flush(self) -> str:
        """The row ended without a stop string: everything not sent yet."""
        if self.stopped:
            return ""
        rest, self._held = self._held + self._window[self._done :], ""
        self._done = len(self._window)
        return rest

    def _decode_from(self, start: int) -> str:
        self.ids_decoded += len(self.ids) - start
        return self.decode(self.ids[start:])

    def _detokenize(self) -> str:
        """The text the last token completed (module doc)."""
        window = self._decode_from(self._start)
        stable = len(window) - (1 if window.endswith("\ufffd") else 0)
        new = window[self._done : stable]
        self._window, self._done = window, max(self._done, stable)
        if len(self.ids) - self._start >= 2 * WINDOW_IDS:
            self._move_window()
        return new

    def _move_window(self) -> None:
        """Start the window `WINDOW_IDS` ids back, if the text it decodes to lines up with the
        current window's at the unsent end and holds some sent text in front (the context a
        first token's decoding rules apply to); else it waits for a later token."""
        start = len(self.ids) - WINDOW_IDS
        head = self._decode_from(start)
        unsent = self._window[self._done :]
        done = len(head) - len(unsent)
        if done >= 1 and head[done:] == unsent:
            self._start, self._window, self._done = start, head, done

    def _scan(self, new: str) -> str:
        """Send `new` after the held-back text, less what may begin a stop string; or stop."""
        text = self._held + new
        if not self.stop:
            self._held = ""
            return text
        self.chars_scanned += len(text) * len(self.stop)
        cuts = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if cuts:  # a match cannot start before the held text: that was no stop's beginning
            self.stopped, self._held = True, ""
            return text[: min(cuts)]
        held = max(self._stop_prefix(text, s) for s in self.stop)
        self._held = text[len(text) - held :] if held else ""
        return text[: len(text) - held]

    def _stop_prefix(self, text: str, stop: str) -> int:
        """The longest end of `text` that begins `stop` (shorter than `stop`), in characters."""
        first = max(len(text) - len(stop) + 1, 0)
        self.chars_scanned += len(text) - first
        i = text.find(stop[0], first)
        while i >= 0:
            if stop.startswith(text[i:]):
                return len(text) - i
            i = text.find(stop[0], i + 1)
        return 0
