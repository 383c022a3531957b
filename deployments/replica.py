"""LLMReplica: one Serve deployment hosting a PrunableModel behind the RAP engine.

It streams events for each request (start, tokens, done or error), reports telemetry to the
controller every period and takes the MaskPlan that comes back. If the controller is dead or
slow, it keeps serving under its last plan and its local fallback (invariant 5); an error in
the reporter (a malformed plan, a failing device-memory reading) is contained and counted, never
a reason for Serve to restart the replica and lose its requests.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import torch
from ray import serve

from deployments.metrics import ReplicaMetrics
from rap.core.errors import RapError
from rap.core.loading import load_model
from rap.core.masks import KeepMask
from rap.planning.registry import make_planner
from rap.serving import faults
from rap.serving.config import ServeAppConfig
from rap.serving.control import EngineBusyError, answered
from rap.serving.engine import Engine, EngineError
from rap.serving.events import StepEvent, error_event
from rap.serving.intake import Intake
from rap.serving.messages import DeviceMemory, MaskPlan
from rap.serving.telemetry import device_memory, initial_budget_bytes, snapshot

log = logging.getLogger("ray.serve")
# OpenAI's codes for what the engine refuses before queueing (EngineError.reason).
CODES = {
    "unknown_model": "model_not_found",
    "queue_full": "queue_full",
    "context_length": "context_length_exceeded",
}


@serve.deployment(max_ongoing_requests=256, health_check_period_s=5)
class LLMReplica:
    async def __init__(  # type: ignore[misc]  # Serve awaits async constructors
        self, app_config: dict[str, Any], name: str, controller: Any
    ) -> None:
        cfg = ServeAppConfig.model_validate(app_config).resolved()
        spec = next(r for r in cfg.replicas if r.name == name)
        torch.set_num_threads(cfg.num_threads)
        self.name, self.cfg, self.controller = name, cfg, controller
        self.model = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device)
        m, e = self.model, cfg.engine
        policy = make_planner(cfg.planner, m.config, m.model_id, m.dtype, e.min_kept_fraction)
        budget = initial_budget_bytes(self.model, spec.budget_gib, cfg, spec.num_gpus)
        self.engine = Engine(self.model, e, budget, policy)
        self.engine.budget_from_device = spec.budget_gib is None and cfg.device == "cuda"
        self.intake = Intake(self.model, self.engine, cfg.served_name or self.model.model_id)
        self.metrics = ReplicaMetrics()
        self._last_tokens, self._last_t = 0, time.monotonic()
        self._counted: dict[str, int] = {}
        self._device: DeviceMemory | None = None
        self.errors = dict.fromkeys(("device_memory", "plan", "telemetry"), 0)
        self._reporter = asyncio.get_running_loop().create_task(self._report_forever())

    # -- requests -------------------------------------------------------------------------
    async def generate(self, call: dict[str, Any]) -> AsyncIterator[StepEvent]:
        """Events for one request; the first is `start` or `error` (with an HTTP status)."""
        started = time.monotonic()
        try:
            request = await self.intake.request(call)
        except EngineError as exc:
            self.metrics.refused.inc(tags={"reason": exc.reason})
            yield error_event(exc.status, exc.message, CODES.get(exc.reason), exc.retry_after_s)
            return
        first: float | None = None
        async for event in self.engine.submit(request):
            if event["type"] == "token" and first is None:
                first = time.monotonic() - started
                self.metrics.ttft.observe(first)
            if event["type"] == "error" and event["status"] == 503:
                reason = "overloaded" if event.get("code") == "overloaded" else "memory"
                self.metrics.refused.inc(tags={"reason": reason})
            if event["type"] == "done":
                self._observe_done(started, first, event["completion_tokens"])
            yield event

    def _observe_done(self, started: float, first: float | None, tokens: int) -> None:
        total = time.monotonic() - started
        self.metrics.e2e.observe(total)
        if first is not None and tokens > 1:
            self.metrics.tpot.observe((total - first) / (tokens - 1))

    # -- operator actions -----------------------------------------------------------------
    async def set_budget(self, budget_bytes: int) -> dict[str, Any]:
        try:
            followed = await answered(self.engine.set_budget(int(budget_bytes)), "the budget")
        except EngineBusyError as exc:  # its step loop is stuck: the router answers 503
            return {"error": str(exc), "status": 503}
        await self._report_once()  # the controller re-plans at once
        return {"replica": self.name, "budget_bytes": followed}

    async def push_mask(self, mask: dict[str, Any] | None) -> dict[str, Any]:
        """An operator's mask as a ceiling (`Engine.set_ceiling`); None releases it."""
        try:
            keep = None
            if mask is not None:
                keep = KeepMask.from_json(json.dumps(mask), origin="pushed mask")
                keep.check_for(self.model.model_id, self.model.num_layers)
                keep = keep.model_copy(update={"source": "user"})
            await answered(self.engine.set_ceiling(keep), "the pushed mask")
        except EngineBusyError as exc:
            return {"error": str(exc), "status": 503}
        except RapError as exc:
            return {"error": str(exc)}
        ceiling = keep.key if keep is not None else None
        return {"replica": self.name, "ceiling": ceiling, "released": keep is None}

    async def telemetry(self) -> dict[str, Any]:
        return self._snapshot().model_dump(mode="json")

    # -- telemetry ------------------------------------------------------------------------
    def _snapshot(self):  # type: ignore[no-untyped-def]
        now = time.monotonic()
        rate = (self.engine.tokens - self._last_tokens) / max(now - self._last_t, 1e-6)
        self._last_tokens, self._last_t = self.engine.tokens, now
        try:
            self._device = device_memory(self.model, self.engine)
        except Exception as exc:  # NVML failing: report the last reading, count the error
            self._count_error("device_memory", exc)
            if self._device is None:
                raise
        tel = snapshot(self.name, self.engine, self._device, rate, sum(self.errors.values()))
        self.metrics.record(tel)
        for kind, count in self.errors.items():
            self.metrics.errors.set(count, tags={"kind": kind})
        return tel

    def _count_error(self, kind: str, exc: BaseException) -> None:
        self.errors[kind] += 1
        log.warning("%s: %s failed (%s: %s); serving on", self.name, kind, type(exc).__name__, exc)

    async def _report_once(self) -> None:
        tel = self._snapshot()
        try:
            reply = await asyncio.wait_for(
                self.controller.report.remote(tel.model_dump(mode="json")), timeout=2.0
            )
        except Exception as exc:  # controller dead or slow: keep the last plan (invariant 5)
            log.warning("%s: controller unreachable (%s); keeping plan", self.name, exc)
            return
        if reply is None:
            return
        try:
            faults.check("plan")
            plan = MaskPlan.model_validate(reply)
        except Exception as exc:  # a malformed plan is the controller's bug: keep the last
            self._count_error("plan", exc)
            return
        if await answered(self.engine.set_plan(plan), "the plan"):
            log.info("%s: plan %s (%s)", self.name, plan.version, plan.reason)

    async def _report_forever(self) -> None:
        while True:
            try:
                await self._report_once()
                self._count_steps()
            except Exception as exc:  # contained: the next period tries again
                self._count_error("telemetry", exc)
            await asyncio.sleep(self.cfg.telemetry_period_s)

    def _count_steps(self) -> None:
        s = self.engine.stats
        for source, seen in (
            ("controller", s.steps_on_controller_mask),
            ("local", s.steps - s.steps_on_controller_mask),
        ):
            new = seen - self._counted.get(source, 0)
            if new > 0:
                self.metrics.steps.inc(new, tags={"source": source})
                self._counted[source] = seen
        new_tokens = self.engine.tokens - self._counted.get("tokens", 0)
        if new_tokens > 0:
            self.metrics.tokens.inc(new_tokens)
            self._counted["tokens"] = self.engine.tokens

    def check_health(self) -> None:
        if self._reporter.done():
            raise RuntimeError(f"the telemetry loop ended: {self._reporter}")
        if not self.engine.alive:
            raise RuntimeError(f"the engine's step loop died (last error: {self.engine.error})")
