"""Typed messages between processes (docs/architecture.md), validated where they arrive.

Telemetry goes replica → controller every period; a MaskPlan comes back controller → replica.
Both are pydantic models, sent as plain dicts (`model_dump(mode="json")`) and re-validated by the
receiver with `model_validate`, so a malformed message fails loudly at the boundary.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from rap.core.masks import KeepMask, MaskVersion


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DeviceMemory(_Message):
    """Device memory as the replica sees it. GPU: NVML's device-wide numbers. CPU: the model's
    own bytes against the configured cap (process RSS is not used: torch and Ray alone hold ~1 GB).
    """

    kind: Literal["cuda", "cpu"]
    device_id: str = Field("", description="NVML UUID of the GPU (replicas sharing it agree).")
    total_bytes: int = Field(ge=0, description="NVML total, or the configured cap on a CPU.")
    used_bytes: int = Field(ge=0, description="NVML used (all processes), or the model's bytes.")
    free_bytes: int = Field(ge=0, description="NVML free (device-wide), or cap minus model bytes.")


class ProcessMemory(_Message):
    """The replica process's own device memory, beside NVML's device-wide figure: what torch's
    caching allocator holds for it (None on a CPU). The GPU run (bench/gpu/replicas.py)
    compares NVML use with these and with the memory model's prediction."""

    pid: int = Field(ge=0, description="The replica's process (NVML lists per-process use).")
    allocated_bytes: int | None = Field(None, description="torch.cuda.memory_allocated().")
    peak_allocated_bytes: int | None = Field(
        None, description="The most torch.cuda.max_memory_allocated() over the last second."
    )
    reserved_bytes: int | None = Field(None, description="torch.cuda.memory_reserved().")


class QueueState(_Message):
    """What the replica is asked to do: waiting and running requests and recent batch shapes."""

    waiting: int = Field(0, ge=0)
    running: int = Field(0, ge=0)
    recent_batch_sizes: list[int] = Field(default_factory=list, description="Last batches' B.")
    recent_longest_seqs: list[int] = Field(
        default_factory=list, description="Last batches' longest sequence, prompt + max_tokens."
    )


class Telemetry(_Message):
    """Replica → controller, every period."""

    replica: str = Field(description="Serve deployment name of the replica, e.g. replica-0.")
    timestamp_s: float = Field(description="Wall-clock time of the snapshot (time.time()).")
    device: DeviceMemory
    budget_bytes: int = Field(ge=0, description="Bytes the model may hold now.")
    budget_from_device: bool = Field(
        False, description="True when the controller derives the budget from NVML (shared GPU)."
    )
    weight_bytes: int = Field(ge=0, description="Weight bytes resident (measured).")
    kv_bytes_in_use: int = Field(0, ge=0, description="Bytes of the KV pages rows hold now.")
    kv_bytes_reserved: int = Field(0, ge=0, description="Bytes of the KV page pool (held).")
    kv_pages_in_use: int = Field(0, ge=0, description="KV pages rows hold, over all layers.")
    kv_pages_free: int = Field(0, ge=0, description="KV pages free, over all layers.")
    queue: QueueState = Field(default_factory=QueueState)
    mask_version: MaskVersion = Field(
        default_factory=MaskVersion,
        description="The newest version the replica holds (its plan's or its model's): a "
        "restarted controller starts its epoch above it.",
    )
    mask_source: str = "user"
    mask_ceiling: str | None = Field(
        None, description="Blocks an operator's pushed mask drops (a KeepMask key), or None."
    )
    errors: int = Field(0, ge=0, description="Telemetry or plan errors the replica contained.")
    num_layers: int = Field(0, ge=0, description="Layers of the model (an attn and an MLP each).")
    attn_kept: int = Field(0, ge=0)
    mlp_kept: int = Field(0, ge=0)
    local_fallbacks: int = Field(0, ge=0, description="Steps run on a local fallback mask.")
    steps: int = Field(0, ge=0, description="Engine steps (one forward each) since start.")
    steps_on_controller_mask: int = Field(0, ge=0)
    preemptions: int = Field(
        0, ge=0, description="Rows preempted by recompute since start (pool cut under them)."
    )
    shed: int = Field(
        0, ge=0, description="Requests refused on arrival since start: predicted start too late."
    )
    tokens_per_s: float = Field(0.0, ge=0.0, description="Generated tokens/s, last period.")
    over_budget_bytes: int = Field(
        0, ge=0, description="High-water mark of (weights + KV pool + step − budget) at switches."
    )
    predicted_bytes: int = Field(
        0,
        ge=0,
        description="weights(mask) + the KV pool + one step, as the memory model "
        "predicts them (rap.serving.sizing.Sizing.bytes_with) for the current mask and pool.",
    )
    want_bytes: int = Field(
        0,
        ge=0,
        description="The most the replica can use: its dense model with a KV pool in which "
        "every row of a full batch holds the whole context, plus one step (0: unknown). GPU "
        "shares never hand a replica more, and give the rest to the others.",
    )
    process: ProcessMemory | None = Field(None, description="The process's own device memory.")


class PlanEntry(_Message):
    """A mask for batches with at most `max_batch` rows and `max_seq` tokens per row."""

    max_batch: int = Field(ge=1)
    max_seq: int = Field(ge=1)
    mask: KeepMask


class MaskPlan(_Message):
    """Controller → replica: its budget and KeepMasks keyed by workload bucket."""

    replica: str
    version: MaskVersion = Field(description="Version of the plan; its masks carry the same.")
    budget_bytes: int | None = Field(
        None, ge=0, description="A budget the controller assigns (shared GPU); None: keep own."
    )
    entries: list[PlanEntry] = Field(default_factory=list)
    reason: str = Field("", description="Why the controller decided this plan (logged).")

    def entry_for(self, batch: int, seq: int) -> PlanEntry | None:
        """The smallest bucket that covers (batch, seq), or None."""
        fitting = [e for e in self.entries if e.max_batch >= batch and e.max_seq >= seq]
        return min(fitting, key=lambda e: (e.max_batch * e.max_seq, e.max_batch), default=None)


class BudgetChange(_Message):
    """Operator → router: a replica's new budget (POST /admin/budget)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    replica: str
    gib: float = Field(gt=0, le=1 << 20, description="New budget in GiB (finite).")


class MaskPush(_Message):
    """Operator → router: a mask for one replica (POST /admin/mask), validated by the replica.
    It is a ceiling: plans and budgets choose beneath it until
    `DELETE /admin/mask?replica=NAME` releases it."""

    replica: str
    mask: dict[str, Any]
