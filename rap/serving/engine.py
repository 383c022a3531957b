"""The replica's engine: a request queue, real batching, admission, and token streams.

Requests wait in a FIFO. One batch runs at a time in a worker thread (a blocking `generate()` on
the event loop would freeze telemetry and streams); tokens reach each request's asyncio queue as
they are produced. A batch runs under one mask from prefill to its last token (invariant 1);
plans, budgets and masks that change meanwhile apply from the next batch. Every admitted request
gets exactly one `done` or `error` event: nothing accepted is dropped silently.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, Field

from rap.core.masks import KeepMask, MaskVersion
from rap.planning import MaskPlanner
from rap.serving.admission import Admission, Admitter, Refusal
from rap.serving.messages import MaskPlan
from rap.serving.streaming import RowState, RowStreamer, StopWhenRowsDone


class EngineConfig(BaseModel):
    """How a replica batches and admits work."""

    max_batch_size: int = Field(8, ge=1, description="Most rows in one batch.")
    batch_wait_s: float = Field(0.05, ge=0, description="Window to gather a batch once idle.")
    min_kept_fraction: float = Field(
        0.5, ge=0, le=1, description="Quality floor: fewest blocks kept, as a share of all."
    )
    retry_after_s: int = Field(2, ge=1, description="Retry-After sent with a memory 503.")
    max_waiting: int = Field(256, ge=1, description="Queue length above which requests get 503.")


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
class GenRequest:
    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)

    def sampling_key(self) -> tuple[float, float]:
        return (self.temperature, self.top_p) if self.temperature > 0 else (0.0, 1.0)


@dataclass
class _Pending:
    request: GenRequest
    queue: asyncio.Queue[dict[str, Any]]


@dataclass
class EngineStats:
    batches: int = 0
    batches_on_controller_mask: int = 0
    local_fallbacks: int = 0
    refused: collections.Counter[str] = field(default_factory=collections.Counter)
    tokens: int = 0
    over_budget_bytes: int = 0
    kv_reserved_bytes: int = 0
    running: int = 0
    recent_shapes: collections.deque[tuple[int, int]] = field(
        default_factory=lambda: collections.deque(maxlen=32)
    )


class Engine:
    """Batches requests for one PrunableModel under a memory budget."""

    def __init__(
        self, model: Any, config: EngineConfig, budget_bytes: int, planner: MaskPlanner | None
    ) -> None:
        self.model = model
        self.config = config
        self.budget_bytes = budget_bytes
        self.budget_from_device = False  # set by the replica when NVML shares decide it
        self.plan: MaskPlan | None = None
        self.stats = EngineStats()
        self.admitter = Admitter(
            model.config, model.model_id, model.dtype, planner, config.min_kept_fraction
        )
        self.context_len = int(getattr(model.config, "max_position_embeddings", 0) or 2**31)
        self._waiting: collections.deque[_Pending] = collections.deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # -- requests -------------------------------------------------------------------------
    def check(self, request: GenRequest) -> None:
        """Refuse what can never run here (400), before it is queued."""
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
        if len(self._waiting) >= self.config.max_waiting:
            raise EngineError(503, "the queue is full", self.config.retry_after_s, "queue_full")

    async def submit(self, request: GenRequest) -> AsyncIterator[dict[str, Any]]:
        """Queue a request; yield its events: start, token..., then done or error."""
        self.check(request)
        pending = _Pending(request, asyncio.Queue())
        self._waiting.append(pending)
        self._ensure_loop()
        self._wake.set()
        while True:
            event = await pending.queue.get()
            yield event
            if event["type"] in ("done", "error"):
                return

    # -- plans and budgets ------------------------------------------------------------------
    def set_plan(self, plan: MaskPlan) -> bool:
        """Take a newer plan (older or equal versions are ignored); it governs the next batch."""
        if self.plan is not None and not self.plan.version < plan.version:
            return False
        self.plan = plan
        if plan.budget_bytes is not None:
            self.budget_bytes = plan.budget_bytes
        self._ensure_loop()
        self._wake.set()
        return True

    def set_budget(self, budget_bytes: int) -> None:
        """An operator's budget: it overrides the device-derived one from now on."""
        self.budget_bytes = budget_bytes
        self.budget_from_device = False
        self._ensure_loop()  # an idle replica shrinks at once, before any request comes
        self._wake.set()

    def version(self) -> MaskVersion:
        current = self.model.mask.version
        return max(current, self.plan.version) if self.plan else current

    # -- the loop -------------------------------------------------------------------------
    def _ensure_loop(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # called outside an event loop (tests): the first submit starts it
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._loop())

    async def _loop(self) -> None:
        # Invariant: one batch at a time, each under the mask admission chose for it; the model's
        # own bytes (weights + reserved KV) never exceed the budget at any admission.
        while True:
            if not self._waiting:
                self._wake.clear()
                await self._fit_idle_model()
                await self._wake.wait()
                continue
            await asyncio.sleep(self.config.batch_wait_s)
            group = self._next_group()
            decision = self.admitter.admit(
                [len(p.request.prompt_ids) for p in group],
                [p.request.max_tokens for p in group],
                self.plan,
                self.budget_bytes,
                self.version(),
            )
            if isinstance(decision, Refusal):
                self._refuse(group[0], decision)
                continue
            rows = group[: decision.rows]
            for p in rows:
                self._waiting.remove(p)
            await self._run(rows, decision)

    def _next_group(self) -> list[_Pending]:
        """FIFO head and the following requests that share its sampling settings."""
        key = self._waiting[0].request.sampling_key()
        same = [p for p in self._waiting if p.request.sampling_key() == key]
        return same[: self.config.max_batch_size]

    def _refuse(self, pending: _Pending, refusal: Refusal) -> None:
        self._waiting.remove(pending)
        self.stats.refused["memory"] += 1
        pending.queue.put_nowait(
            {
                "type": "error",
                "status": 503,
                "message": refusal.reason,
                "retry_after": self.config.retry_after_s,
            }
        )

    async def _fit_idle_model(self) -> None:
        """When idle and over a (new) budget, shrink now: a co-tenant is waiting for the bytes."""
        if self.model.weight_bytes() <= self.budget_bytes:
            return
        decision = self.admitter.admit([1], [1], self.plan, self.budget_bytes, self.version())
        if isinstance(decision, Admission):
            await asyncio.to_thread(self._apply, decision.mask)

    def _apply(self, mask: KeepMask) -> None:
        if mask != self.model.mask:
            self.model.apply(mask)

    async def _run(self, rows: list[_Pending], decision: Admission) -> None:
        loop = asyncio.get_running_loop()
        states = [RowState(p.request, p.queue, loop, self.model, self.stats) for p in rows]
        self.stats.running = len(rows)
        self.stats.kv_reserved_bytes = decision.kv_reserved_bytes
        try:
            await asyncio.to_thread(self._apply, decision.mask)
            own = self.model.weight_bytes() + decision.kv_reserved_bytes
            self.stats.over_budget_bytes = max(
                self.stats.over_budget_bytes, own - self.budget_bytes
            )
            self._count(decision, states)  # before any row can finish
            fingerprint = decision.mask.fingerprint()
            for s in states:
                s.start(fingerprint)
            await asyncio.to_thread(self._generate, states)
        except Exception as exc:  # a failed batch must still answer every row
            for s in states:
                s.fail(500, f"generation failed: {type(exc).__name__}: {exc}")
        finally:
            self.stats.running = 0
            self.stats.kv_reserved_bytes = 0

    def _generate(self, states: list[RowState]) -> None:
        head = states[0].request
        sampling = (
            {"do_sample": True, "temperature": head.temperature, "top_p": head.top_p}
            if head.temperature > 0
            else {}
        )
        self.model.generate_ids(
            [s.request.prompt_ids for s in states],
            max(s.request.max_tokens for s in states),
            streamer=RowStreamer(states),
            stopping_criteria=[StopWhenRowsDone(states)],
            sampling=sampling,
        )
        for s in states:
            s.finish()

    def _count(self, decision: Admission, states: list[RowState]) -> None:
        self.stats.batches += 1
        if decision.mask.from_controller:
            self.stats.batches_on_controller_mask += 1
        elif decision.mask.kept_fraction < 1.0:
            self.stats.local_fallbacks += 1
        longest = max(len(s.request.prompt_ids) + s.request.max_tokens for s in states)
        self.stats.recent_shapes.append((len(states), longest))

    @property
    def waiting(self) -> int:
        return len(self._waiting)
