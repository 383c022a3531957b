"""Metrics through `ray.serve.metrics` (Prometheus names get Ray's `ray_` prefix).

Recorded inside Serve replicas, so Serve adds `deployment`, `replica` and `application` tags.
The controller's own metrics also carry `target` (the replica a decision was for), since the
replica tag there names the controller. Glossary: docs/metrics.md.
"""

from __future__ import annotations

from typing import Any

from ray.serve import metrics

LATENCY_BOUNDARIES_S = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]


class ReplicaMetrics:
    """A replica's gauges, counters and latency histograms."""

    def __init__(self) -> None:
        g = metrics.Gauge
        self.budget = g("rap_budget_bytes", description="Bytes the model may hold now.")
        self.weights = g("rap_weight_bytes", description="Weight bytes resident (measured).")
        self.kv_reserved = g("rap_kv_reserved_bytes", description="Bytes of the KV page pool.")
        self.kv_in_use = g("rap_kv_in_use_bytes", description="Bytes of the KV pages rows hold.")
        self.pages_in_use = g("rap_kv_pages_in_use", description="KV pages rows hold.")
        self.pages_free = g("rap_kv_pages_free", description="KV pages free.")
        self.running = g("rap_queue_running", description="Rows running (decoding or prefilling).")
        self.device_used = g(
            "rap_device_used_bytes", description="Device memory used (NVML, all processes)."
        )
        self.device_free = g("rap_device_free_bytes", description="Device memory free (NVML).")
        self.attn_kept = g("rap_attn_blocks_kept", description="Attention blocks kept.")
        self.mlp_kept = g("rap_mlp_blocks_kept", description="MLP blocks kept.")
        self.mask_seq = g("rap_mask_version_seq", description="Sequence part of the mask version.")
        self.mask_epoch = g("rap_mask_version_epoch", description="Epoch part of the mask version.")
        self.waiting = g("rap_queue_waiting", description="Requests waiting for a batch.")
        self.tokens_per_s = g("rap_tokens_per_second", description="Generated tokens per second.")
        self.over_budget = g(
            "rap_over_budget_bytes", description="High-water mark of own bytes above the budget."
        )
        self.preemptions = g(
            "rap_preemptions", description="Rows preempted by recompute since the replica started."
        )
        self.steps = metrics.Counter(
            "rap_steps_total",
            description="Engine steps (one forward each), by mask source.",
            tag_keys=("source",),
        )
        self.refused = metrics.Counter(
            "rap_admissions_refused_total",
            description="Requests refused, by reason.",
            tag_keys=("reason",),
        )
        self.tokens = metrics.Counter("rap_generated_tokens_total", description="Tokens generated.")
        # A gauge per kind, set from the start: a counter never incremented exports no series.
        self.errors = g(
            "rap_replica_errors",
            description="Errors the replica contained and served on since it started, by kind "
            "(device_memory: NVML failing; plan: a malformed plan; telemetry: the reporter).",
            tag_keys=("kind",),
        )
        # A gauge, not a counter: a counter never incremented exports no series at all.
        self.fallbacks = g(
            "rap_local_fallback_steps",
            description="Steps run on a pruned local fallback mask since the replica started.",
        )
        h = metrics.Histogram
        self.ttft = h(
            "rap_time_to_first_token_seconds",
            description="Time to first token.",
            boundaries=LATENCY_BOUNDARIES_S,
        )
        self.tpot = h(
            "rap_time_per_output_token_seconds",
            description="Time per output token.",
            boundaries=LATENCY_BOUNDARIES_S,
        )
        self.e2e = h(
            "rap_request_latency_seconds",
            description="End-to-end request latency.",
            boundaries=LATENCY_BOUNDARIES_S,
        )

    def record(self, tel: Any) -> None:
        """Set the gauges from a `Telemetry` snapshot."""
        self.budget.set(tel.budget_bytes)
        self.weights.set(tel.weight_bytes)
        self.kv_reserved.set(tel.kv_bytes_reserved)
        self.kv_in_use.set(tel.kv_bytes_in_use)
        self.device_used.set(tel.device.used_bytes)
        self.device_free.set(tel.device.free_bytes)
        self.fallbacks.set(tel.local_fallbacks)
        self.attn_kept.set(tel.attn_kept)
        self.mlp_kept.set(tel.mlp_kept)
        self.mask_seq.set(tel.mask_version.seq)
        self.mask_epoch.set(tel.mask_version.epoch)
        self.waiting.set(tel.queue.waiting)
        self.running.set(tel.queue.running)
        self.pages_in_use.set(tel.kv_pages_in_use)
        self.pages_free.set(tel.kv_pages_free)
        self.tokens_per_s.set(tel.tokens_per_s)
        self.over_budget.set(tel.over_budget_bytes)
        self.preemptions.set(tel.preemptions)


class ControllerMetrics:
    """The controller's decisions, labelled with the replica each was for."""

    def __init__(self) -> None:
        self.decisions = metrics.Counter(
            "rap_controller_decisions_total",
            description="Plans decided, by target replica.",
            tag_keys=("target",),
        )
        # Gauges of the policy's own counts: exported from the start (a counter never
        # incremented exports no series) and labelled with the policy's kind.
        self.policy_decisions = metrics.Gauge(
            "rap_controller_policy_decisions",
            description="Bucket masks the controller's policy decided since it started.",
            tag_keys=("policy",),
        )
        self.policy_fallbacks = metrics.Gauge(
            "rap_controller_policy_fallbacks",
            description="Of those, decisions where the RAP policy stopped over budget and "
            "mem-greedy planned instead.",
            tag_keys=("policy",),
        )
        self.reports = metrics.Counter(
            "rap_controller_reports_total",
            description="Telemetry reports received.",
            tag_keys=("target", "fresh"),  # type: ignore[arg-type]
        )
