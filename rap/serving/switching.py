"""Every mask and pool change of a replica, at the step boundary, bytes going down first.

The engine decides where to go (the target mask and pages per layer, `rap.serving.sizing`);
the `Switcher` gets there, acting on the scheduler only through its named methods (pause and
resume admission, narrow rows, preempt to fit, resize, replace, drop and add pool layers) and on
the model through `PrunableModel.apply`:

    no change        relabel a new version of the same blocks; admit again
    nothing runs     pause admission, free the old pool, apply the mask, a new pool
    rows run         shrink: drop the blocks, narrow each row (pages in dropped attention layers
                     back, their slabs freed whole), then cut the pool (preempting the youngest
                     rows whose reservations no longer fit); grow: cut first if the pool
                     shrinks, then restore once the weights fit beside the pool (read beside the
                     steps, `rap.serving.restores`), else pause admission until rows end;
                     then grow the pool as far as one layer's copy allows

Which mask to run now on the way to the target is the no-thrash rule (`row_masks.next_mask`):
a shrink at once, a grow once the budget has allowed it long enough, a change between masks
neither of which holds the other only while nothing runs (or its shrinking half when the budget
forces it). Invariants 1, 2 and 6 of docs/architecture.md.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from rap.core.masks import KeepMask
from rap.serving import row_masks
from rap.serving.engine_config import EngineConfig
from rap.serving.restores import Prefetch
from rap.serving.scheduler import Scheduler
from rap.serving.sizing import Sizing
from rap.serving.stats import EngineStats

log = logging.getLogger("rap.serving.engine")

Fetched = dict[tuple[str, int], torch.Tensor]
"""The blocks a restore read beforehand, by block (`Prefetch.ready`)."""


def switch(
    scheduler: Scheduler, mask: KeepMask, floor: float = 0.0, fetched: Fetched | None = None
) -> None:
    """Make `mask` the model's under running rows: each row loses what `mask` drops from the
    next step (pages and reservations in those attention layers go back, then the layers'
    slabs are freed whole); blocks `mask` restores get slabs of the pool's capacity, used by
    rows admitted from now on. Weights: every drop before any restore (`PrunableModel.apply`).
    A row that would fall below the quality floor (`floor`, or its request's own minimum) is
    preempted instead, to be recomputed under a mask that meets it. `fetched`: the restored
    blocks already read (`rap.serving.restores`)."""
    old = scheduler.model.mask
    scheduler.narrow_rows(row_masks.intersect(old, mask), floor)
    pairs = list(enumerate(zip(old.attn, mask.attn, strict=True)))
    scheduler.drop_layers([layer for layer, (was, now) in pairs if was and not now])
    scheduler.model.apply(mask, fetched=fetched)  # restores read beforehand only bind
    scheduler.add_layers([layer for layer, (was, now) in pairs if now and not was])


class Switcher:
    """Gets the model and the pool to the engine's target, one boundary at a time (module
    doc). Runs on the engine's thread only."""

    def __init__(
        self,
        model: Any,
        config: EngineConfig,
        sizing: Sizing,
        scheduler: Scheduler,
        prefetch: Prefetch,
        stats: EngineStats,
    ) -> None:
        self.model, self.config, self.sizing = model, config, sizing
        self.scheduler, self.prefetch, self.stats = scheduler, prefetch, stats
        self.budget_bytes = 0
        """The budget of the boundary being handled (`apply` sets it)."""

    def apply(self, target: tuple[KeepMask, int], target_since_s: float, budget: int) -> None:
        """One boundary's part of the way to `target` (mask, pages per layer), which the budget
        has allowed since `target_since_s` (time.monotonic())."""
        self.budget_bytes = budget
        mask, pages = self._next(target, target_since_s)
        sched = self.scheduler
        if mask.key == self.model.mask.key and pages == sched.pool.capacity:
            if mask != self.model.mask:  # a new version or label of the same blocks: no drain
                self.model.apply(mask)
            sched.resume_admission()
            return
        grow, fetched = not row_masks.is_within(mask, self.model.mask), None
        if grow and sched.running and pages < sched.pool.capacity:
            self._cut_pool(pages)  # bytes go down before a restore's are read
        if grow and self._fits_beside(mask):
            fetched = self.prefetch.ready(mask)
            if fetched is None:
                return  # its blocks are read beside the steps (rap.serving.restores)
        if sched.running:
            self._change_under_rows(mask, pages, fetched)
            return
        self._replace(mask, pages, fetched)

    def _replace(self, mask: KeepMask, pages: int, fetched: Fetched | None) -> None:
        """Nothing runs: the old slabs go before the new mask's weights come, then a new pool."""
        sched = self.scheduler
        sched.pause_admission()
        sched.drop_graphs()
        sched.replace_pool(self.sizing.pool(None, 0))
        started_s = time.monotonic()
        change = self.model.apply(mask, fetched=fetched)
        if fetched is None:  # read here (nothing runs): its rate is the next restore's forecast
            self.prefetch.note(change.restored_bytes, started_s)
        sched.replace_pool(self.sizing.pool(mask, pages))
        sched.resume_admission()
        self.stats.note_switch()
        self.note_bytes()
        log.info("switched to %s with %d KV pages per layer", mask.fingerprint(), pages)

    def _next(self, target: tuple[KeepMask, int], target_since_s: float) -> tuple[KeepMask, int]:
        """What to run now on the way to the target (no thrash, docs/engine.md): a shrink at
        once; a grow once the target has held for `grow_after_s` (memory back for long enough)
        and for `restore_patience` × its predicted copy time (`Prefetch.wait_s`);
        a change to a mask that is neither — which would leave running rows with the
        intersection of both — only while nothing runs, or, when the budget forces it, its
        shrinking half now (the intersection) and the rest as a grow later."""
        mask_, pages = target
        current = self.model.mask
        wait_s = self.prefetch.wait_s(
            current, mask_, self.config.grow_after_s, self.config.restore_patience
        )
        settled = time.monotonic() - target_since_s >= wait_s
        forced = self.sizing.bytes_with(current, pages) > self.budget_bytes
        running = bool(self.scheduler.running)
        floor = self.config.min_kept_fraction
        mask = row_masks.next_mask(current, mask_, settled, running, forced, floor)
        if mask.key == mask_.key:
            return mask_, pages
        return mask, self.sizing.pages(mask, self.budget_bytes)

    def _fits_beside(self, mask: KeepMask) -> bool:
        """Whether the blocks `mask` restores fit the budget beside what is held now (a restore
        is budgeted before it starts: read first, dropped blocks go after); for a grow, whether
        `mask` can run beside the running rows' pool."""
        union = row_masks.union(self.model.mask, mask)
        return self.sizing.bytes_with(union, self.scheduler.pool.capacity) <= self.budget_bytes

    def _change_under_rows(self, mask: KeepMask, pages: int, fetched: Fetched | None) -> None:
        """Mask and pool change while rows run (invariant 1), bytes going down first: a shrink
        drops blocks before the pool is compacted; a grow waits for the pool to shrink (if it
        does) and then for room beside it. Rows are preempted (youngest first, by recompute)
        only when their reservations cannot fit the new pool. The bytes held are noted once
        the change is done."""
        shrink = row_masks.is_within(mask, self.model.mask)
        if shrink and mask.key != self.model.mask.key:
            self._switch_in_place(mask)
        sched = self.scheduler
        if pages < sched.pool.capacity:
            self._cut_pool(pages)
        if not shrink:
            if not self._fits_beside(mask):
                sched.pause_admission()  # the running rows must end first
                self.note_bytes()
                return
            self._switch_in_place(mask, fetched)
        grown = self._grow_pages(mask, pages)
        if grown > sched.pool.capacity:
            sched.resize_pool(grown)
        sched.resume_admission()
        self.note_bytes()

    def _cut_pool(self, pages: int) -> None:
        sched = self.scheduler
        sched.drop_graphs()
        preempted = sched.fit(pages)
        sched.resize_pool(pages)
        self.stats.note_switch()
        log.info("KV pool cut to %d pages per layer (%d rows preempted)", pages, preempted)

    def _grow_pages(self, mask: KeepMask, pages: int) -> int:
        """The largest pool up to `pages` that fits beside one old layer's slabs while that
        layer is copied (pool.resize goes layer by layer). `pages` itself, sized to the whole
        budget, never does: asking for it kept the pool small under running rows until they
        all ended (the memory-shock bench), so grow as far as the copy allows now;
        the rest comes when nothing runs."""
        d = self.model.dims
        old_layer = 2 * self.scheduler.pool.capacity * self.config.page_tokens * d.kv_heads
        old_layer *= d.head_dim * self.model.dtype.itemsize
        return min(pages, self.sizing.pages(mask, self.budget_bytes - old_layer))

    def _switch_in_place(self, mask: KeepMask, fetched: Fetched | None = None) -> None:
        """Running rows go on (invariant 1): they lose what `mask` drops from the next step,
        with those attention layers' slabs freed whole, and skip what it restores."""
        self.scheduler.drop_graphs()
        switch(self.scheduler, mask, self.config.min_kept_fraction, fetched)
        self.stats.note_switch()
        rows = len(self.scheduler.running)
        log.info("switched to %s under %d running rows", mask.fingerprint(), rows)

    def note_bytes(self) -> None:
        """The engine's own bytes against the budget (`EngineStats.over_budget_bytes`)."""
        pool = self.scheduler.pool
        step = self.sizing.step_bytes() if pool.capacity else 0  # no pages: no step can run
        own = self.model.weight_bytes() + pool.nbytes + step
        self.stats.note_bytes(own, self.budget_bytes)
