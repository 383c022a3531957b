"""The replica's engine: per-step scheduling in a worker thread, token streams on asyncio.

Invariant: the model's own bytes — weights of the mask that runs + the KV page pool + one step's
activations — fit the budget whenever a row is admitted, and a budget that falls is met at the
next step without waiting for running rows: the mask shrinks under them (each row narrows to
it, `rap.serving.row_masks`), the pool is compacted and cut, and only rows whose reservations
cannot fit any allowed pool are preempted by recompute. A grow waits for room beside the pool
and serves rows admitted after it. Every switch drops before it restores.

The mask and the pool come from the budget (`rap.serving.sizing.Sizing.choose`): the dense model
while it holds a full batch, else the controller's plan entry, else the local planner's mask,
never below the quality floor, preferring those whose pool keeps the running rows.

The scheduler (`rap.serving.scheduler`) does the rest: admission by page reservation, chunked
prefill, one forward per step, cancellation, stop strings. A blocking forward on the event loop
would freeze telemetry and streams, so steps run in a thread of their own and each request's
events reach its asyncio queue through `call_soon_threadsafe`. An error outside one request's
work (a planner failing) is logged and counted; the loop goes on, and a dead loop shows in
`error` (the replica's health check).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from rap.core.errors import BudgetError
from rap.core.masks import KeepMask, MaskVersion
from rap.planning import MaskPlanner
from rap.serving import row_masks
from rap.serving.engine_config import EngineConfig
from rap.serving.events import TERMINAL, StepEvent
from rap.serving.messages import MaskPlan
from rap.serving.outbox import Outbox
from rap.serving.restores import Prefetch
from rap.serving.scheduler import Request, Scheduler
from rap.serving.sizing import Sizing

log = logging.getLogger("rap.serving.engine")

__all__ = ["Engine", "EngineConfig", "EngineError"]


class EngineError(Exception):
    """A request the engine refuses, with the HTTP status and reason to answer."""

    def __init__(
        self, status: int, message: str, retry_after_s: int | None = None, reason: str = "invalid"
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after_s = retry_after_s
        self.reason = reason
        """A short label for metrics: invalid, context_length, queue_full, unknown_model."""


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


class Engine:
    """Runs one PrunableModel for many requests under a memory budget (module doc)."""

    def __init__(
        self, model: Any, config: EngineConfig, budget_bytes: int, planner: MaskPlanner | None
    ) -> None:
        self.model, self.config, self.planner = model, config, planner
        self.budget_bytes = budget_bytes
        self.requested_budget_bytes = budget_bytes
        """The last budget asked for (= budget_bytes unless `follow_budget` is off)."""
        self.budget_from_device = False  # set by the replica when NVML shares decide it
        self.plan: MaskPlan | None = None
        self.ceiling: KeepMask | None = (
            KeepMask.from_key(model.model_id, model.num_layers, config.static_mask)
            if config.static_mask is not None
            else None
        )
        """An operator's pushed mask (or the configured static one): no block it drops runs
        until it is released."""
        self.stats = EngineStats()
        self.error: BaseException | None = None
        self.sizing = Sizing(model, config)
        self.context_len = self.sizing.context_len
        self.prefetch = Prefetch(model)
        self._target = self._choose()
        self._target_since = 0.0
        mask, pages = self._target
        model.apply(mask)
        self.scheduler = Scheduler(model, self.sizing.pool(mask, pages), config.scheduler())
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._work, name="rap-engine", daemon=True)
        self._thread.start()

    # -- requests -------------------------------------------------------------------------
    def check(self, request: Request) -> None:
        """Refuse what can never run here (400) or cannot wait here (503), before queueing."""
        total = len(request.prompt_ids) + request.max_tokens
        if not request.prompt_ids:
            raise EngineError(400, "the prompt is empty")
        if total > self.context_len:
            raise EngineError(
                400,
                f"prompt ({len(request.prompt_ids)} tokens) + max_tokens ({request.max_tokens}) = "
                f"{total} exceeds the model's context of {self.context_len} tokens",
                reason="context_length",
            )
        if len(self.scheduler.waiting) >= self.config.max_waiting:
            raise EngineError(503, "the queue is full", self.config.retry_after_s, "queue_full")

    async def submit(self, request: Request) -> AsyncIterator[StepEvent]:
        """Queue a request; yield its events: start, token..., then done or error. A consumer
        that stops early (a client gone, Serve cancelling) cancels the request; one that reads
        slowly holds its row back once `max_pending_events` wait for it (`rap.serving.outbox`)."""
        self.check(request)
        outbox = Outbox(
            asyncio.get_running_loop(),
            self.config.max_pending_events,
            on_drain=self._wake.set,
            on_put=self._priced,
        )
        row_id = self.scheduler.add(request, outbox)
        self._wake.set()
        ended = False
        try:
            while not ended:
                event = await outbox.get()
                ended = event["type"] in TERMINAL
                yield event
        finally:
            if not ended:
                self.cancel(row_id)

    def _priced(self, event: StepEvent) -> None:
        """A done event gains the predicted quality cost of the mask that served it (None if
        the planner cannot say: the client still gets its done event)."""
        if event["type"] != "done" or "mask_key" not in event:
            return
        try:
            event["predicted_delta_lnppl"] = self._quality_cost(event["mask_key"])
        except Exception as exc:
            self.stats.planner_errors += 1
            log.warning("no predicted quality cost for %s (%s)", event["mask_key"], exc)
            event["predicted_delta_lnppl"] = None

    def _quality_cost(self, key: str) -> float | None:
        """The planner's predicted Δ ln perplexity of the mask a row was served under."""
        if self.planner is None:
            return None
        mask = KeepMask.from_key(self.model.model_id, self.model.num_layers, key)
        return self.planner.quality_cost(mask)

    def cancel(self, row_id: int) -> None:
        self.scheduler.cancel(row_id)
        self._wake.set()

    # -- plans and budgets ------------------------------------------------------------------
    def set_plan(self, plan: MaskPlan) -> bool:
        """Take a newer plan (older or equal versions are ignored)."""
        if self.plan is not None and not self.plan.version < plan.version:
            return False
        self.plan = plan
        if plan.budget_bytes is not None and self.config.follow_budget:
            self.budget_bytes = plan.budget_bytes
        self._retarget()
        return True

    def set_ceiling(self, ceiling: KeepMask | None) -> None:
        """An operator's mask (None releases it): every mask chosen keeps only blocks it keeps;
        plans, budgets and the floor still apply beneath it."""
        if ceiling is not None and ceiling.kept_fraction < self.config.min_kept_fraction:
            raise BudgetError(
                f"the mask keeps {ceiling.kept_fraction:.1%} of the blocks, below the replica's "
                f"quality floor of {self.config.min_kept_fraction:.1%}",
                fix="push a mask that keeps more blocks, or lower engine.min_kept_fraction",
            )
        if ceiling is None and self.config.static_mask is not None:
            ceiling = KeepMask.from_key(
                self.model.model_id, self.model.num_layers, self.config.static_mask
            )  # released: back to the configured static mask
        self.ceiling = ceiling
        self._retarget()

    def set_budget(self, budget_bytes: int) -> None:
        """An operator's budget: it overrides the device-derived one from now on (recorded but
        not followed when `follow_budget` is off: the replica stays as it was sized)."""
        self.requested_budget_bytes = budget_bytes
        if not self.config.follow_budget:
            return
        self.budget_bytes = budget_bytes
        self.budget_from_device = False
        self._retarget()

    def version(self) -> MaskVersion:
        current = self.model.mask.version
        return max(current, self.plan.version) if self.plan else current

    def _choose(self) -> tuple[KeepMask, int]:
        """(mask, pages per layer) for the budget, plan and ceiling now (`Sizing.choose`)."""
        held = self.scheduler.reserved_pages() if hasattr(self, "scheduler") else 0
        return self.sizing.choose(
            self.budget_bytes, self.plan, self.ceiling, self.planner, self.version(), held
        )

    def _retarget(self) -> None:
        try:
            target = self._choose()
            if target[0].key != self._target[0].key:
                self._target_since = time.monotonic()  # a grow waits from here (hysteresis)
            self._target = target
        except Exception as exc:  # a planner failing must not take the replica down
            self.stats.planner_errors += 1
            log.warning("keeping the current mask: planning failed (%s)", exc)
        self._wake.set()

    # -- the loop -----------------------------------------------------------------------------
    def _work(self) -> None:
        ran = False  # whether the last step ran a forward
        while True:
            try:
                self._wake.wait(timeout=self._pause_s(ran))
                self._wake.clear()
                self._maybe_switch()
                if not self.scheduler.running and not self.scheduler.waiting:
                    continue
                ran = self.scheduler.step()
                self._record_step()
            except Exception as exc:  # outside any one request's work: fail fast, keep serving
                self.error = exc
                log.exception("engine step failed; the loop goes on")
                self._wake.set()

    def _pause_s(self, ran: bool) -> float | None:
        """How long the loop sleeps unless woken: not at all after a forward; a poll while a
        switch is pending or rows wait (for pages, or for their clients to read); else until
        woken (a request, a plan, a budget)."""
        if ran and not self.scheduler.idle:
            return 0.0
        pending = self._target[0].key != self.model.mask.key
        return 0.05 if pending or not self.scheduler.idle else None

    def _maybe_switch(self) -> None:
        mask, pages = self._next()
        current = self.scheduler.pool
        if mask.key == self.model.mask.key and pages == current.capacity:
            if mask != self.model.mask:  # a new version or label of the same blocks: no drain
                self.model.apply(mask)
            self.scheduler.admitting = True
            return
        grow, fetched = not row_masks.is_within(mask, self.model.mask), None
        if grow and self.scheduler.running and pages < current.capacity:
            self._cut_pool(pages)  # bytes go down before a restore's are read
        if grow and self._fits_beside(mask):
            fetched = self.prefetch.ready(mask)
            if fetched is None:
                return  # its blocks are read beside the steps (rap.serving.restores)
        if self.scheduler.running:
            self._change_under_rows(mask, pages, fetched)
            return
        self.scheduler.admitting = False
        self.scheduler.drop_graphs()
        self.scheduler.pool = self.sizing.pool(None, 0)  # the old slabs go before the new mask
        del current
        started_s = time.monotonic()
        change = self.model.apply(mask, fetched=fetched)
        if fetched is None:  # read here (nothing runs): its rate is the next restore's forecast
            self.prefetch.note(change.restored_bytes, started_s)
        self.scheduler.pool = self.sizing.pool(mask, pages)
        self.scheduler.admitting = True
        self.stats.switches += 1
        self._note_bytes()
        log.info("switched to %s with %d KV pages per layer", mask.fingerprint(), pages)

    def _next(self) -> tuple[KeepMask, int]:
        """What to run now on the way to the target (no thrash, docs/engine.md): a shrink at
        once; a grow once the target has held for `grow_after_s` (memory back for long enough)
        and for `restore_patience` × its predicted copy time (`Prefetch.wait_s`);
        a change to a mask that is neither — which would leave running rows with the
        intersection of both — only while nothing runs, or, when the budget forces it, its
        shrinking half now (the intersection) and the rest as a grow later."""
        target, pages = self._target
        current = self.model.mask
        wait_s = self.prefetch.wait_s(
            current, target, self.config.grow_after_s, self.config.restore_patience
        )
        settled = time.monotonic() - self._target_since >= wait_s
        forced = self.sizing.bytes_with(current, pages) > self.budget_bytes
        running = bool(self.scheduler.running)
        floor = self.config.min_kept_fraction
        mask = row_masks.next_mask(current, target, settled, running, forced, floor)
        if mask.key == target.key:
            return target, pages
        return mask, self.sizing.pages(mask, self.budget_bytes)

    def _fits_beside(self, mask: KeepMask) -> bool:
        """Whether the blocks `mask` restores fit the budget beside what is held now (a restore
        is budgeted before it starts: read first, dropped blocks go after); for a grow, whether
        `mask` can run beside the running rows' pool."""
        union = row_masks.union(self.model.mask, mask)
        return self.sizing.bytes_with(union, self.scheduler.pool.capacity) <= self.budget_bytes

    def _change_under_rows(
        self, mask: KeepMask, pages: int, fetched: dict[Any, Any] | None = None
    ) -> None:
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
                sched.admitting = False  # the running rows must end first
                self._note_bytes()
                return
            self._switch_in_place(mask, fetched)
        grown = self._grow_pages(mask, pages)
        if grown > sched.pool.capacity:
            sched.pool.resize(grown, [r.pages for r in sched.running])
        sched.admitting = True
        self._note_bytes()

    def _cut_pool(self, pages: int) -> None:
        sched = self.scheduler
        sched.drop_graphs()
        preempted = sched.fit(pages)
        sched.pool.resize(pages, [r.pages for r in sched.running])
        self.stats.switches += 1
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

    def _switch_in_place(self, mask: KeepMask, fetched: dict[Any, Any] | None = None) -> None:
        """Running rows go on (invariant 1): they lose what `mask` drops from the next step,
        with those attention layers' slabs freed whole, and skip what it restores."""
        self.scheduler.drop_graphs()
        row_masks.switch(self.scheduler, mask, self.config.min_kept_fraction, fetched)
        self.stats.switches += 1
        rows = len(self.scheduler.running)
        log.info("switched to %s under %d running rows", mask.fingerprint(), rows)

    def _note_bytes(self) -> None:
        pool = self.scheduler.pool
        step = self.sizing.step_bytes() if pool.capacity else 0  # no pages: no step can run
        own = self.model.weight_bytes() + pool.nbytes + step
        self.stats.over_budget_bytes = max(self.stats.over_budget_bytes, own - self.budget_bytes)

    def _record_step(self) -> None:
        s, sched = self.stats, self.scheduler
        s.steps += 1
        mask = self.model.mask
        if mask.from_controller:
            s.steps_on_controller_mask += 1
        elif mask.kept_fraction < 1.0:
            s.local_fallbacks += 1
        if sched.stats.longest:
            s.recent_shapes.append((len(sched.running) or 1, sched.stats.longest))
            sched.stats.longest = 0

    # -- what telemetry reads ----------------------------------------------------------------
    @property
    def alive(self) -> bool:
        """Whether the step loop runs (the replica's health check)."""
        return self._thread.is_alive()

    @property
    def waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def running(self) -> int:
        return len(self.scheduler.running)

    @property
    def tokens(self) -> int:
        return self.scheduler.stats.generated

    def kv_bytes_held(self) -> int:
        return self.scheduler.pool.nbytes
