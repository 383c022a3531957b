"""Budgets of replicas that share one GPU, from NVML's device-wide free memory.

NVML's free memory is the device's, so two replicas on one GPU must not both claim it. The
replicas on a device may hold together

    total = Σ_r own_r + (free − margin)

where own_r is what replica r holds now (weights + reserved KV). (free − margin) is signed: when
another tenant takes memory out of the margin, the total falls below what the replicas hold
and their budgets fall with it, so they give the margin back. The total is shared max-min
fairly (water-filling): every replica gets an equal part, except that none gets more than it
can use (`want_r`: its dense model with every row of a full batch at the whole context;
unknown: no cap), and what one cannot use goes to the others:

    budget_r = min(want_r, level),   Σ_r budget_r = total   (or every replica at its want)

Two findings on an H100 (`bench/results/gpu/h100-run2-replicas.json.gz`) made it so.
The deficit used to be clamped at 0: a co-tenant that held 16 GiB left 1.1 GiB free against a
9.6 GiB margin, no budget moved, and its next 8 GiB step failed for 30 s. And each replica got
own_r + (free − margin) / n, which kept whatever difference the replicas started with: the one
that sized its KV pool first held 47.5 GB, the other 8–13 GB, for the whole run.

Changes smaller than `hysteresis_bytes` are ignored, and a budget rises only after `dwell_s`
since its last change, so a replica that just freed memory is not handed it back at once (the
co-tenant that needed it gets the time to take it). Decreases apply at once: they protect.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from pydantic import BaseModel, Field

from rap.core.constants import GIB
from rap.serving.messages import Telemetry


class ShareConfig(BaseModel):
    """Hysteresis and dwell for device-derived budgets."""

    margin_bytes: int = Field(GIB, ge=0, description="Free memory never handed out.")
    hysteresis_bytes: int = Field(64 << 20, ge=0, description="Smaller changes are ignored.")
    dwell_s: float = Field(10.0, ge=0, description="Minimum time between a budget's rises.")


@dataclass
class GpuShares:
    """Remembers each replica's assigned budget and when it last changed."""

    config: ShareConfig = field(default_factory=ShareConfig)
    budgets: dict[str, int] = field(default_factory=dict)
    changed_s: dict[str, float] = field(default_factory=dict)

    def assign(self, telemetry: Iterable[Telemetry], now_s: float) -> dict[str, int]:
        """Budgets for every GPU replica whose budget comes from the device, per device."""
        by_device: dict[str, list[Telemetry]] = {}
        for t in telemetry:
            if t.device.kind == "cuda" and t.budget_from_device:
                by_device.setdefault(t.device.device_id, []).append(t)
        out: dict[str, int] = {}
        for group in by_device.values():
            spare = min(t.device.free_bytes for t in group) - self.config.margin_bytes
            total = sum(t.weight_bytes + t.kv_bytes_reserved for t in group) + spare
            wants = {t.replica: t.want_bytes or None for t in group}
            for replica, target in water_fill(max(total, 0), wants).items():
                out[replica] = self._settle(replica, target, now_s)
        return out

    def _settle(self, replica: str, target: int, now_s: float) -> int:
        old = self.budgets.get(replica)
        if old is None:
            return self._set(replica, target, now_s)
        if abs(target - old) < self.config.hysteresis_bytes:
            return old
        rising = target > old
        if rising and now_s - self.changed_s.get(replica, 0.0) < self.config.dwell_s:
            return old
        return self._set(replica, target, now_s)

    def _set(self, replica: str, budget: int, now_s: float) -> int:
        self.budgets[replica] = budget
        self.changed_s[replica] = now_s
        return budget


def water_fill(total: int, wants: dict[str, int | None]) -> dict[str, int]:
    """`total` bytes shared max-min fairly: replicas in order of their wants (None: no cap), each
    taking min(want, an equal part of what is left)."""
    order = sorted(wants, key=lambda r: (wants[r] is None, wants[r] or 0))
    out: dict[str, int] = {}
    left = total
    for i, replica in enumerate(order):
        part = left // (len(order) - i)
        want = wants[replica]
        out[replica] = part if want is None else min(want, part)
        left -= out[replica]
    return out
