"""Text a request may carry to the tokenizer and the stop-string check, and why it is refused.

Both the router's validation (`rap.serving.openai_api`) and the replica's intake apply these,
so every refusal is a 400 naming the field before anything is queued.
"""

from __future__ import annotations

import re

MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 256
"""A stop string's bound: the replica scans this much overlap of its text per token."""

_SURROGATE = re.compile("[\ud800-\udfff]")


def text_problem(text: str) -> str | None:
    """Why `text` cannot be tokenized, or None. JSON may escape half a UTF-16 pair (`"\\ud800"`)
    and Python's parser keeps it as a lone surrogate, which has no UTF-8 form: the tokenizer
    raises on it. (A whole pair is parsed as one character, so any surrogate left is lone.)"""
    found = _SURROGATE.search(text)
    if found is None:
        return None
    return (
        f"holds an unpaired UTF-16 surrogate (\\u{ord(found.group()):04x} at character "
        f"{found.start()}); expected valid Unicode: escape a character outside the BMP as a "
        "full surrogate pair, or send it as UTF-8"
    )


def stop_problem(stop: list[str]) -> str | None:
    """Why a stop list is refused (named `stop[j]`), or None."""
    if len(stop) > MAX_STOP_STRINGS:
        return (
            f"stop has {len(stop)} sequences: at most {MAX_STOP_STRINGS} stop sequences are allowed"
        )
    for j, s in enumerate(stop):
        if len(s) > MAX_STOP_CHARS:
            return (
                f"stop[{j}] has {len(s):,} characters: a stop sequence has at most "
                f"{MAX_STOP_CHARS}; shorten it"
            )
        problem = text_problem(s)
        if problem:
            return f"stop[{j}] {problem}"
    return None


def checked_text(field: str, text: str) -> str:
    """`text`, or a ValueError naming `field` (for pydantic validators)."""
    problem = text_problem(text)
    if problem:
        raise ValueError(f"{field} {problem}")
    return text
