"""The counters the engine and its scheduler keep, and the pool's gauges, as telemetry reads
them: written on the engine's thread only; other threads read `EngineGauges`, a frozen copy the
engine publishes at every step boundary and after every step (one reference swapped, so a
reader never walks the pool's dicts while the engine changes them)."""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

from rap.core.masks import KeepMask


@dataclass
class StepStats:
    steps: int = 0
    forwards: int = 0
    tokens: int = 0
    """Tokens through the model (prompt chunks and decodes)."""
    generated: int = 0
    prefill_tokens: int = 0
    admitted: int = 0
    preempted: int = 0
    shed: int = 0
    """Requests refused on arrival: the queue predicted too late a start (`shedding`)."""
    longest: int = 0
    """Longest row (prompt + max_tokens) admitted since the engine last read it."""

    def note_forward(self, tokens: int) -> None:
        self.forwards += 1
        self.tokens += tokens

    def note_step(self) -> None:
        """A step's forward ran and its rows got their tokens' KV."""
        self.steps += 1

    def note_prefill(self, tokens: int) -> None:
        self.prefill_tokens += tokens

    def note_generated(self) -> None:
        self.generated += 1

    def note_preempted(self) -> None:
        self.preempted += 1

    def note_shed(self) -> None:
        self.shed += 1

    def note_admitted(self, row_tokens: int | None) -> None:
        """A row started; `row_tokens` (prompt + max_tokens) for a new one, None for one that
        resumes after a preemption (its shape was counted when it first started)."""
        self.admitted += 1
        if row_tokens is not None:
            self.longest = max(self.longest, row_tokens)

    def take_longest(self) -> int:
        """The longest row admitted since the last call (0: none)."""
        longest, self.longest = self.longest, 0
        return longest


@dataclass(frozen=True)
class EngineGauges:
    """The KV pool and the queue as the engine's thread last saw them."""

    capacity_pages: int = 0
    """Pages per kept attention layer."""
    held_bytes: int = 0
    """Bytes its slabs hold (`PagePool.nbytes`)."""
    used_bytes: int = 0
    used_pages: int = 0
    free_pages: int = 0
    row_tokens: int = 0
    """Most tokens one row can hold in it (`Sizing.row_tokens`)."""
    preempted: int = 0
    """Rows preempted so far (`StepStats.preempted`)."""
    shed: int = 0
    """Requests refused on arrival so far (`StepStats.shed`)."""
    waiting: int = 0
    running: int = 0


@dataclass
class EngineStats:
    steps: int = 0
    steps_on_controller_mask: int = 0
    local_fallbacks: int = 0
    """Steps run on a pruned mask the replica planned itself."""
    switches: int = 0
    planner_errors: int = 0
    over_budget_bytes: int = 0
    recent_shapes: collections.deque[tuple[int, int]] = field(
        default_factory=lambda: collections.deque(maxlen=32)
    )

    def note_step(self, mask: KeepMask, running: int, longest: int) -> None:
        """A step ran under `mask`; `longest`: the longest row admitted since the last step
        (0: none), noted with the rows running as one recent shape."""
        self.steps += 1
        if mask.from_controller:
            self.steps_on_controller_mask += 1
        elif mask.kept_fraction < 1.0:
            self.local_fallbacks += 1
        if longest:
            self.recent_shapes.append((running or 1, longest))

    def note_switch(self) -> None:
        """A mask or pool change."""
        self.switches += 1

    def note_planner_error(self) -> None:
        self.planner_errors += 1

    def note_bytes(self, own_bytes: int, budget_bytes: int) -> None:
        """The high-water mark of the engine's own bytes above its budget."""
        self.over_budget_bytes = max(self.over_budget_bytes, own_bytes - budget_bytes)
