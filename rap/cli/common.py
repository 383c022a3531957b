"""What the command line's quality commands share: a progress bar, torch threads, list flags."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tqdm import tqdm

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
