"""LLMReplica: one Serve deployment hosting a PrunableModel behind the RAP engine.

It streams events for each request (start, tokens, done or error), reports telemetry to the
controller every period and takes the MaskPlan that comes back. If the controller is dead or
slow, it keeps serving under its last plan and its local fallback (invariant 5).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import torch
from pydantic import ValidationError
from ray import serve

from deployments.metrics import ReplicaMetrics
from rap.core.errors import RapError
from rap.core.loading import load_model
from rap.core.masks import KeepMask
from rap.planning import HeuristicPolicy
from rap.serving.config import ServeAppConfig
from rap.serving.engine import Engine, EngineError, GenRequest
from rap.serving.messages import MaskPlan, PlanEntry
from rap.serving.telemetry import GenerateCall, device_memory, initial_budget_bytes, snapshot

log = logging.getLogger("ray.serve")


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
        self.served_name = cfg.served_name or self.model.model_id
        policy = HeuristicPolicy(
            self.model.config,
            self.model.model_id,
            self.model.dtype,
            cfg.planner,
            cfg.engine.min_kept_fraction,
        )
        budget = initial_budget_bytes(self.model, spec.budget_gib, cfg)
        self.engine = Engine(self.model, cfg.engine, budget, policy)
        self.engine.budget_from_device = spec.budget_gib is None and cfg.device == "cuda"
        self.metrics = ReplicaMetrics()
        self._last_tokens, self._last_t = 0, time.monotonic()
        self._counted: dict[str, int] = {}
        self._reporter = asyncio.get_running_loop().create_task(self._report_forever())

    # -- requests -------------------------------------------------------------------------
    async def generate(self, call: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Events for one request; the first is `start` or `error` (with an HTTP status)."""
        started = time.monotonic()
        try:
            req = GenerateCall.model_validate(call)
            if req.model != self.served_name:
                raise EngineError(
                    404,
                    f"model {req.model!r} does not exist; this server serves {self.served_name!r}",
                    reason="unknown_model",
                )
            ids = self.model.encode(req.messages or req.prompt, chat=False)
            request = GenRequest(
                ids, req.max_tokens, req.temperature, req.top_p, req.stop, req.seed
            )
            self.engine.check(request)
        except EngineError as exc:
            self.metrics.refused.inc(tags={"reason": exc.reason})
            yield {
                "type": "error",
                "status": exc.status,
                "message": exc.message,
                "retry_after": exc.retry_after_s,
            }
            return
        except (RapError, ValidationError) as exc:
            self.metrics.refused.inc(tags={"reason": "invalid"})
            yield {"type": "error", "status": 400, "message": str(exc)}
            return
        first: float | None = None
        async for event in self.engine.submit(request):
            if event["type"] == "token" and first is None:
                first = time.monotonic() - started
                self.metrics.ttft.observe(first)
            if event["type"] == "error" and event["status"] == 503:
                self.metrics.refused.inc(tags={"reason": "memory"})
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
        self.engine.set_budget(int(budget_bytes))
        await self._report_once()  # the controller re-plans at once
        return {"replica": self.name, "budget_bytes": self.engine.budget_bytes}

    async def push_mask(self, mask: dict[str, Any]) -> dict[str, Any]:
        """An operator's mask: validated, then used for every batch until the next plan."""
        try:
            keep = KeepMask.from_json(json.dumps(mask), origin="pushed mask")
            keep.check_for(self.model.model_id, self.model.num_layers)
        except RapError as exc:
            return {"error": str(exc)}
        version = self.engine.version().model_copy(update={"seq": self.engine.version().seq + 1})
        keep = keep.model_copy(update={"version": version, "source": "user"})
        plan = MaskPlan(
            replica=self.name,
            version=version,
            reason="pushed by an operator",
            entries=[PlanEntry(max_batch=10**6, max_seq=10**9, mask=keep)],
        )
        self.engine.set_plan(plan)
        return {"replica": self.name, "version": str(version)}

    async def telemetry(self) -> dict[str, Any]:
        return self._snapshot().model_dump(mode="json")

    # -- telemetry ------------------------------------------------------------------------
    def _snapshot(self):  # type: ignore[no-untyped-def]
        now = time.monotonic()
        rate = (self.engine.tokens - self._last_tokens) / max(now - self._last_t, 1e-6)
        self._last_tokens, self._last_t = self.engine.tokens, now
        tel = snapshot(self.name, self.engine, device_memory(self.model, self.engine), rate)
        self._record(tel)
        return tel

    def _record(self, tel: Any) -> None:
        m = self.metrics
        m.budget.set(tel.budget_bytes)
        m.weights.set(tel.weight_bytes)
        m.kv_reserved.set(tel.kv_bytes_reserved)
        m.kv_in_use.set(tel.kv_bytes_in_use)
        m.device_used.set(tel.device.used_bytes)
        m.device_free.set(tel.device.free_bytes)
        m.fallbacks.set(tel.local_fallbacks)
        m.attn_kept.set(tel.attn_kept)
        m.mlp_kept.set(tel.mlp_kept)
        m.mask_seq.set(tel.mask_version.seq)
        m.mask_epoch.set(tel.mask_version.epoch)
        m.waiting.set(tel.queue.waiting)
        m.running.set(tel.queue.running)
        m.pages_in_use.set(tel.kv_pages_in_use)
        m.pages_free.set(tel.kv_pages_free)
        m.tokens_per_s.set(tel.tokens_per_s)
        m.over_budget.set(tel.over_budget_bytes)

    async def _report_once(self) -> None:
        tel = self._snapshot()
        try:
            reply = await asyncio.wait_for(
                self.controller.report.remote(tel.model_dump(mode="json")), timeout=2.0
            )
        except Exception as exc:  # controller dead or slow: keep the last plan (invariant 5)
            log.warning("%s: controller unreachable (%s); keeping plan", self.name, exc)
            return
        if reply is not None and self.engine.set_plan(MaskPlan.model_validate(reply)):
            log.info("%s: plan %s (%s)", self.name, reply["version"], reply["reason"])

    async def _report_forever(self) -> None:
        while True:
            await self._report_once()
            self._count_batches()
            await asyncio.sleep(self.cfg.telemetry_period_s)

    def _count_batches(self) -> None:
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
        if self._reporter.done() and self._reporter.exception() is not None:
            raise RuntimeError(f"telemetry loop died: {self._reporter.exception()}")
        if not self.engine.alive:
            raise RuntimeError(f"the engine's step loop died (last error: {self.engine.error})")
