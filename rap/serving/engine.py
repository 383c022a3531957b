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
events reach its asyncio queue through `call_soon_threadsafe`. Plans, budgets and ceilings
come the other way as messages (`rap.serving.control`): the engine's thread applies them at the
next step boundary, idle or not, so only it reads and changes the scheduler's rows and pool;
every mask and pool change is the switcher's (`rap.serving.switching`). An error outside one
request's work (a planner failing) is logged and counted; the loop goes on, and a dead loop shows in
`error` (the replica's health check).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import Future
from typing import Any

from rap.core.errors import BudgetError
from rap.core.masks import KeepMask, MaskVersion
from rap.planning import MaskPlanner
from rap.serving.control import Control, ControlQueue, SetBudget, SetCeiling, SetPlan
from rap.serving.engine_config import EngineConfig
from rap.serving.events import TERMINAL, StepEvent
from rap.serving.messages import MaskPlan
from rap.serving.outbox import Outbox
from rap.serving.restores import Prefetch
from rap.serving.scheduler import Request, Scheduler
from rap.serving.sizing import Sizing
from rap.serving.stats import EngineGauges, EngineStats
from rap.serving.switching import Switcher

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
        self._target = self._choose(held_pages=0)  # no row runs yet
        self._target_since = 0.0
        mask, pages = self._target
        model.apply(mask)
        self.scheduler = Scheduler(model, self.sizing.pool(mask, pages), config.scheduler())
        self.switcher = Switcher(
            model, config, self.sizing, self.scheduler, self.prefetch, self.stats
        )
        self._wake = threading.Event()
        self._control = ControlQueue()
        self._publish()
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
            self.stats.note_planner_error()
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

    # -- plans and budgets: queued, applied on the engine's thread (rap.serving.control) --------
    def set_plan(self, plan: MaskPlan) -> Future[bool]:
        """Offer a plan; its future says whether it was taken (older or equal versions are
        not)."""
        return self._send(SetPlan(plan))

    def set_ceiling(self, ceiling: KeepMask | None) -> Future[KeepMask | None]:
        """An operator's mask (None releases it): every mask chosen keeps only blocks it keeps;
        plans, budgets and the floor still apply beneath it. One below the floor is refused
        here, at once (the check reads the configuration only); its future gives the ceiling
        held once applied."""
        if ceiling is not None and ceiling.kept_fraction < self.config.min_kept_fraction:
            raise BudgetError(
                f"the mask keeps {ceiling.kept_fraction:.1%} of the blocks, below the replica's "
                f"quality floor of {self.config.min_kept_fraction:.1%}",
                fix="push a mask that keeps more blocks, or lower engine.min_kept_fraction",
            )
        return self._send(SetCeiling(ceiling))

    def set_budget(self, budget_bytes: int) -> Future[int]:
        """An operator's budget: it overrides the device-derived one from now on (recorded but
        not followed when `follow_budget` is off: the replica stays as it was sized). Its
        future gives the budget followed once applied."""
        return self._send(SetBudget(budget_bytes))

    def _send(self, message: Control) -> Future[Any]:
        future = self._control.put(message)
        self._wake.set()
        return future

    def _apply_controls(self) -> None:
        """Every queued message, oldest first, at the step boundary; each future gets its
        answer, or the error applying it raised."""
        for message, future in self._control.drain():
            try:
                result = self._apply(message)
            except Exception as exc:
                if not future.done():
                    future.set_exception(exc)
                continue
            if not future.done():
                future.set_result(result)

    def _apply(self, message: Control) -> object:
        if isinstance(message, SetPlan):
            return self._take_plan(message.plan)
        if isinstance(message, SetBudget):
            return self._take_budget(message.budget_bytes)
        return self._take_ceiling(message.ceiling)

    def _take_plan(self, plan: MaskPlan) -> bool:
        if self.plan is not None and not self.plan.version < plan.version:
            return False
        self.plan = plan
        if plan.budget_bytes is not None and self.config.follow_budget:
            self.budget_bytes = plan.budget_bytes
        self._retarget()
        return True

    def _take_ceiling(self, ceiling: KeepMask | None) -> KeepMask | None:
        if ceiling is None and self.config.static_mask is not None:
            ceiling = KeepMask.from_key(
                self.model.model_id, self.model.num_layers, self.config.static_mask
            )  # released: back to the configured static mask
        self.ceiling = ceiling
        self._retarget()
        return ceiling

    def _take_budget(self, budget_bytes: int) -> int:
        self.requested_budget_bytes = budget_bytes
        if self.config.follow_budget:
            self.budget_bytes = budget_bytes
            self.budget_from_device = False
            self._retarget()
        return self.budget_bytes

    def version(self) -> MaskVersion:
        current = self.model.mask.version
        return max(current, self.plan.version) if self.plan else current

    def _choose(self, held_pages: int) -> tuple[KeepMask, int]:
        """(mask, pages per layer) for the budget, plan and ceiling now (`Sizing.choose`),
        keeping the running rows' `held_pages` if any allowed mask does."""
        return self.sizing.choose(
            self.budget_bytes, self.plan, self.ceiling, self.planner, self.version(), held_pages
        )

    def _retarget(self) -> None:
        try:
            target = self._choose(self.scheduler.reserved_pages())
            if target[0].key != self._target[0].key:
                self._target_since = time.monotonic()  # a grow waits from here (hysteresis)
            self._target = target
        except Exception as exc:  # a planner failing must not take the replica down
            self.stats.note_planner_error()
            log.warning("keeping the current mask: planning failed (%s)", exc)

    # -- the loop -----------------------------------------------------------------------------
    def _work(self) -> None:
        ran = False  # whether the last step ran a forward
        while True:
            try:
                self._wake.wait(timeout=self._pause_s(ran))
                self._wake.clear()
                self._boundary()
                if not self.scheduler.running and not self.scheduler.waiting:
                    continue
                ran = self.scheduler.step()
                self._record_step()
            except Exception as exc:  # outside any one request's work: fail fast, keep serving
                self.error = exc
                log.exception("engine step failed; the loop goes on")
                self._wake.set()

    def _boundary(self) -> None:
        """Between two steps: what other threads sent, then the switch it calls for."""
        self._apply_controls()
        self._maybe_switch()
        self._publish()

    def _publish(self) -> None:
        """The pool's and the queue's gauges for other threads (`stats.EngineGauges`)."""
        pool = self.scheduler.pool
        self.gauges = EngineGauges(
            capacity_pages=pool.capacity,
            held_bytes=pool.nbytes,
            used_bytes=pool.used_bytes(),
            used_pages=pool.used_pages(),
            free_pages=pool.free_total(),
            row_tokens=self.sizing.row_tokens(pool),
            preempted=self.scheduler.stats.preempted,
            shed=self.scheduler.stats.shed,
            waiting=len(self.scheduler.waiting),
            running=len(self.scheduler.running),
        )

    def _pause_s(self, ran: bool) -> float | None:
        """How long the loop sleeps unless woken: not at all after a forward; a poll while a
        switch is pending or rows wait (for pages, or for their clients to read); else until
        woken (a request, a plan, a budget)."""
        if ran and not self.scheduler.idle:
            return 0.0
        pending = self._target[0].key != self.model.mask.key
        return 0.05 if pending or not self.scheduler.idle else None

    def _maybe_switch(self) -> None:
        """The switch the target calls for at this boundary (`rap.serving.switching`)."""
        self.switcher.apply(self._target, self._target_since, self.budget_bytes)

    def _record_step(self) -> None:
        sched = self.scheduler
        self.stats.note_step(self.model.mask, len(sched.running), sched.take_longest())
        self._publish()

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
        """The pool's bytes now, read on the engine's thread or while it is idle; other threads
        read `gauges` (`held_bytes`)."""
        return self.scheduler.pool.nbytes
