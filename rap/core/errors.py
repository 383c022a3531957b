"""Errors a user can act on: each says what was wrong, what was expected and how to fix it.

The command line prints `str(error)` on one line and exits with status 2 for any `RapError`;
the server maps them to 4xx answers. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class RapError(Exception):
    """Base class: `what` went wrong, what was `expected`, and how to `fix` it."""

    def __init__(self, what: str, expected: str = "", fix: str = "") -> None:
        self.what = what
        self.expected = expected
        self.fix = fix
        super().__init__(self.message)

    @property
    def message(self) -> str:
        parts = [self.what]
        if self.expected:
            parts.append(f"expected {self.expected}")
        if self.fix:
            parts.append(self.fix)
        return "; ".join(parts)


class UnsupportedModelError(RapError):
    """The model's architecture has no block layout that RAP knows how to prune."""


class ModelNotFoundError(RapError):
    """A model name or path that resolves to nothing loadable."""


class MaskError(RapError):
    """A keep-mask that is malformed, of the wrong length, for another model, or out of range."""


class MaskBusyError(RapError):
    """A mask change asked for while a generation holds the current mask."""


class BudgetError(RapError):
    """A memory budget that no allowed mask can meet."""
