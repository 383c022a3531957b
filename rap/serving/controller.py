"""The RAP controller's decisions: telemetry in, one MaskPlan per replica out (no Ray here).

For each replica with fresh telemetry the controller plans a KeepMask per workload bucket
(batch ≤ b, longest sequence ≤ s) that its telemetry shows, under the replica's budget, with the
policy (`rap.planning.policy`: the trained RAP policy by default, or a heuristic planner), each mask
labelled with the planner that made it. Plans are versioned (epoch, seq): a
controller that starts takes an epoch above every version it finds in telemetry, so replicas
accept its plans after a restart. Stale telemetry (older than `stale_after_s`) is not planned on.
Every decision is recorded with its reason.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, Field

from rap.core.constants import MIB
from rap.core.errors import BudgetError
from rap.core.masks import KeepMask, MaskVersion
from rap.planning import MaskPlanner
from rap.serving.budget import GpuShares, ShareConfig
from rap.serving.messages import MaskPlan, PlanEntry, Telemetry

log = logging.getLogger("rap.serving.controller")


class ControllerConfig(BaseModel):
    """How the controller plans."""

    stale_after_s: float = Field(5.0, gt=0, description="Telemetry older than this is not used.")
    seq_buckets: tuple[int, ...] = Field(
        (256, 1024, 2048), description="Sequence-length bucket edges (tokens, prompt + output)."
    )
    batch_buckets: tuple[int, ...] = Field((1, 4, 8), description="Batch-size bucket edges.")
    history: int = Field(200, ge=1, description="Decisions kept for the admin state view.")
    shares: ShareConfig = Field(default_factory=ShareConfig)
    step_tokens: int | None = Field(
        None,
        ge=1,
        description="Tokens of the engine step whose activations each plan prices: the "
        "replicas' engine.max_step_tokens (the app config sets it). None: a bucket's whole "
        "batch × sequence, which over-prices a chunked prefill (183 MiB at 8 × 2,048 tokens).",
    )


@dataclass
class ReplicaView:
    telemetry: Telemetry
    received_s: float
    plan: MaskPlan | None = None
    buckets: frozenset[tuple[int, int]] = frozenset()
    """Buckets the plan was made for, those that nothing fits included (not re-planned)."""

    def assigned(self, telemetry: Telemetry) -> None:
        """Its telemetry with the budget the controller assigns it (a device's share)."""
        self.telemetry = telemetry

    def planned(self, plan: MaskPlan, buckets: frozenset[tuple[int, int]]) -> None:
        self.plan, self.buckets = plan, buckets


@dataclass
class Decision:
    replica: str
    at_s: float
    version: str
    reason: str
    entries: int


def _round_up(value: int, edges: tuple[int, ...]) -> int:
    """The first edge at or above `value`; beyond the last edge, the next power of two."""
    return next((e for e in edges if e >= value), 1 << (value - 1).bit_length())


@dataclass
class Controller:
    """Keeps the latest telemetry per replica and decides their plans."""

    planner: MaskPlanner
    """Plans each bucket; its masks name it (`controller:rap`, ...), so that responses and
    telemetry say which planner served."""
    config: ControllerConfig = field(default_factory=ControllerConfig)
    epoch: int | None = None
    seq: int = 0
    replicas: dict[str, ReplicaView] = field(default_factory=dict)
    decisions: deque[Decision] = field(default_factory=lambda: deque(maxlen=200))
    shares: GpuShares = field(default_factory=GpuShares)

    def __post_init__(self) -> None:
        self.shares = GpuShares(self.config.shares)
        self.decisions = deque(self.decisions, maxlen=self.config.history)

    def report(self, telemetry: Telemetry, now_s: float | None = None) -> MaskPlan | None:
        """Take a replica's telemetry; answer its plan when it is new or changed, else None."""
        now_s = time.time() if now_s is None else now_s
        held = telemetry.mask_version
        if self.epoch is None or MaskVersion(epoch=self.epoch, seq=self.seq) < held:
            # A fresh controller, or a replica holding a version this one never issued (an
            # earlier incarnation's): start an epoch above it so the replica accepts new plans.
            self.epoch, self.seq = held.epoch + 1, 0
        prev = self.replicas.get(telemetry.replica)
        view = ReplicaView(
            telemetry, now_s, prev.plan if prev else None, prev.buckets if prev else frozenset()
        )
        self.replicas[telemetry.replica] = view
        if now_s - telemetry.timestamp_s > self.config.stale_after_s:
            log.warning(
                "telemetry from %s is %.1f s old: not planning on it",
                telemetry.replica,
                now_s - telemetry.timestamp_s,
            )
            return None
        assigned = self._device_budget(telemetry, now_s)
        if assigned is not None and assigned != telemetry.budget_bytes:
            telemetry = telemetry.model_copy(update={"budget_bytes": assigned})
            view.assigned(telemetry)
        buckets = self.buckets(telemetry)
        entries = self._entries(telemetry.budget_bytes, buckets)
        reason = self._reason(prev, telemetry, buckets)
        if reason is None and view.plan is not None and view.plan.version.epoch == self.epoch:
            if telemetry.mask_version < view.plan.version:
                # The replica never took it (lost, or refused as malformed): send it again.
                return view.plan
            return None
        self.seq += 1
        version = MaskVersion(epoch=self.epoch, seq=self.seq)
        plan = MaskPlan(
            replica=telemetry.replica,
            version=version,
            budget_bytes=assigned,
            entries=[
                PlanEntry(
                    max_batch=b,
                    max_seq=s,
                    mask=m.model_copy(update={"version": version}),
                )
                for (b, s), m in entries.items()
            ],
            reason=reason or "controller epoch started",
        )
        view.planned(plan, frozenset(buckets))
        self.decisions.append(
            Decision(telemetry.replica, now_s, str(version), plan.reason, len(plan.entries))
        )
        log.info(
            "plan %s for %s: %s (%d buckets)",
            version,
            telemetry.replica,
            plan.reason,
            len(plan.entries),
        )
        return plan

    def _device_budget(self, telemetry: Telemetry, now_s: float) -> int | None:
        """The replica's share of its GPU (fresh telemetry of its device-mates), or None."""
        if not (telemetry.budget_from_device and telemetry.device.kind == "cuda"):
            return None
        fresh = [
            v.telemetry
            for v in self.replicas.values()
            if now_s - v.telemetry.timestamp_s <= self.config.stale_after_s
        ]
        return self.shares.assign(fresh, now_s).get(telemetry.replica)

    def buckets(self, telemetry: Telemetry) -> list[tuple[int, int]]:
        """(batch, seq) buckets to plan for: the configured grid plus what the queue has shown
        beyond it, so that most batches find a controller mask from the start."""
        cfg = self.config
        seen = {(b, s) for b in cfg.batch_buckets for s in cfg.seq_buckets}
        q = telemetry.queue
        for b, s in zip(q.recent_batch_sizes, q.recent_longest_seqs, strict=False):
            seen.add((_round_up(b, cfg.batch_buckets), _round_up(s, cfg.seq_buckets)))
        return sorted(seen)

    def _entries(
        self, budget: int, buckets: list[tuple[int, int]]
    ) -> dict[tuple[int, int], KeepMask]:
        out = {}
        for b, s in buckets:
            try:
                mask = self.planner.plan(budget, b, s, self.config.step_tokens)
            except BudgetError:
                continue  # nothing fits this bucket: the replica splits or refuses such batches
            if not mask.from_controller:
                raise ValueError(
                    f"the controller's planner labelled a mask {mask.source!r}; expected one of "
                    "controller:rap, controller:rap-fallback, controller:heuristic, "
                    "controller:search"
                )
            out[(b, s)] = mask
        return out

    def _reason(
        self, prev: ReplicaView | None, tel: Telemetry, buckets: list[tuple[int, int]]
    ) -> str | None:
        if prev is None or prev.plan is None:
            return f"first plan for {tel.replica} (budget {tel.budget_bytes / MIB:.1f} MiB)"
        old = prev.telemetry
        if old.budget_bytes != tel.budget_bytes:
            return f"budget changed {old.budget_bytes / MIB:.1f} → {tel.budget_bytes / MIB:.1f} MiB"
        new = [bk for bk in buckets if bk not in prev.buckets]
        if new:
            return f"new workload buckets {new}"
        return None

    def state(self, now_s: float | None = None) -> dict[str, Any]:
        """A JSON-able view for operators: each replica's telemetry age, plan and decisions."""
        now_s = time.time() if now_s is None else now_s
        return {
            "epoch": self.epoch,
            "replicas": {
                name: {
                    "age_s": round(now_s - v.telemetry.timestamp_s, 3),
                    "stale": now_s - v.telemetry.timestamp_s > self.config.stale_after_s,
                    "telemetry": v.telemetry.model_dump(mode="json"),
                    "plan": v.plan.model_dump(mode="json") if v.plan else None,
                }
                for name, v in self.replicas.items()
            },
            "decisions": [d.__dict__ for d in list(self.decisions)[-50:]],
        }
