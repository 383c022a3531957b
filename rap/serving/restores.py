"""Restores off the step loop: a grow's blocks are read beside the steps and bound between two.

Reading a block back (a safetensors read on a CPU, a host→device copy on a GPU) is the slow half
of a restore; done on the engine's thread it would stall every running row for as long. So the
engine asks `Prefetch.ready(mask)` at each step boundary: the first call starts reading the
blocks `mask` restores in a thread of its own and answers None (the current mask keeps
running); once they are read, it answers them, and `PrunableModel.apply(mask, fetched=...)`
only binds them. The engine starts one only when the bytes fit the budget beside what it holds.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from rap.core.masks import KeepMask

Block = tuple[str, int]


@dataclass
class Prefetch:
    """One restore read at a time, for the newest mask asked for."""

    model: Any
    last_bytes: int = 0
    last_s: float = 0.0
    """Bytes and seconds of the last restore read (its copy rate is what the next will take)."""
    _key: str | None = None
    _started: float = 0.0
    _future: Future[dict[Block, torch.Tensor]] | None = None
    _pool: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=1, thread_name_prefix="rap-restore")
    )

    def ready(self, mask: KeepMask) -> dict[Block, torch.Tensor] | None:
        """The blocks `mask` restores, read, when they are; None while they are being read (a
        new mask starts a new read; a read for an older one is dropped, its buffers freed)."""
        if self._key != mask.key or self._future is None:
            self._key, self._started = mask.key, time.monotonic()
            self._future = self._pool.submit(self.model.fetch_restores, mask)
            return None
        if not self._future.done():
            return None
        fetched = self._future.result()  # a failed read raises here, on the engine's thread
        self._key, self._future = None, None
        self.last_bytes = sum(t.numel() * t.element_size() for t in fetched.values())
        self.last_s = time.monotonic() - self._started
        return fetched
