"""What the command line's commands share: a progress bar, torch threads, list flags, secrets."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm import tqdm

from rap.core.constants import STEP_TOKENS
from rap.core.errors import RapError


def tqdm_progress(desc: str) -> Callable[[int, int, str], None]:
    """A progress callback that drives one tqdm bar (created on the first call)."""

    bar: list[Any] = []

    def update(done: int, total: int, note: str) -> None:
        if not bar:
            bar.append(tqdm(total=total, desc=desc, unit="step"))
        bar[0].set_postfix_str(note)
        bar[0].update(done - bar[0].n)
        if done >= total:
            bar[0].close()

    return update


def set_threads(n: int | None) -> None:
    if n:
        import torch  # lazy: heavy (torch)

        torch.set_num_threads(n)


def parse_list(text: str, flag: str, cast: Callable[[str], Any]) -> list[Any]:
    try:
        return [cast(x.strip()) for x in text.split(",") if x.strip()]
    except ValueError:
        raise RapError(f"{flag} {text!r} is not a comma-separated list") from None


def read_secret(path: str | None, env: str, what: str) -> str | None:
    """A secret (`what`, e.g. "admin token") from the file at `path`, else from the environment
    variable `env`; None when neither holds one.

    Secrets never come from a flag's value: any user on the machine can read a command line in
    `ps`, and shells keep it in their history. A file named but missing, unreadable or empty is
    an error rather than a silent fallback to `env`, so a typo never runs without the secret.
    """
    if path is None:
        return os.environ.get(env) or None
    try:
        secret = Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise RapError(
            f"cannot read the {what} file {path} ({reason})",
            fix=f"check the path and its permissions, or set {env} instead",
        ) from None
    if not secret:
        raise RapError(
            f"the {what} file {path} is empty",
            expected=f"the {what} in it",
            fix=f"write it there, or set {env} instead",
        )
    return secret


def add_prefill_tokens(parser: Any) -> None:
    """`--prefill-tokens`, as `rap plan` and `rap eval` price it (one byte accounting)."""
    parser.add_argument(
        "--prefill-tokens",
        type=int,
        default=STEP_TOKENS,
        help="prompt tokens per row: every method alike prices the engine step that feeds "
        f"them, min(batch × this, {STEP_TOKENS}) tokens (prompts go in chunks)",
    )
