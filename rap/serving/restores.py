"""Restores off the step loop: a grow's blocks are read beside the steps and bound between two.

Reading a block back (a safetensors read on a CPU, a host→device copy on a GPU) is the slow half
of a restore; done on the engine's thread it would stall every running row for as long. So the
engine asks `Prefetch.ready(mask)` at each step boundary: the first call starts reading the
blocks `mask` restores in a thread of its own and answers None (the current mask keeps
running); once they are read, it answers them, and `PrunableModel.apply(mask, fetched=...)`
only binds them. A restore is budgeted before it starts, in bytes and in time: it starts only
when its bytes fit the budget beside what the engine holds, and only once the budget has allowed
the grow for `restore_patience` × its predicted copy time (at the rate the last read ran) —
a restore that takes long is worth starting only on evidence that the memory stays.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from rap.core.masks import KeepMask
from rap.serving import row_masks

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

    def copy_s(self, nbytes: int) -> float:
        """Predicted seconds to read `nbytes` back: nbytes × last_s / last_bytes (the rate the
        last read ran at); 0.0 before any read (nothing measured yet)."""
        if self.last_bytes <= 0:
            return 0.0
        return nbytes * self.last_s / self.last_bytes

    def wait_s(self, current: KeepMask, target: KeepMask, floor_s: float, patience: float) -> float:
        """Seconds the budget must allow `target` before the grow from `current` starts:
        max(floor_s, patience × copy_s(restored bytes)), restored bytes = weights(current ∪
        target) − weights(current)."""
        union = row_masks.union(current, target)
        weights = self.model.predicted_weight_bytes
        return max(floor_s, patience * self.copy_s(weights(union) - weights(current)))

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
        self.note(sum(t.numel() * t.element_size() for t in fetched.values()), self._started)
        return fetched

    def note(self, nbytes: int, started_s: float) -> None:
        """Remember a read of `nbytes` that began at `started_s` (time.monotonic()) and ends
        now, wherever it ran: its rate predicts the next restore's copy time."""
        if nbytes > 0:
            self.last_bytes, self.last_s = nbytes, time.monotonic() - started_s
