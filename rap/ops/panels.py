"""The panels of the RAP Serve dashboard: one row per concern, PromQL on exact metric names.

Names are those deployments/metrics.py defines, with Ray's `ray_` prefix (glossary:
docs/metrics.md), plus a few of Serve's own (`SERVE_METRICS`). rap/ops/grafana.py lays the rows out
and renders the dashboard JSON, the way Ray's grafana_dashboard_factory renders its panels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Replica metrics carry Serve's tags; the controller's carry `target` (the replica a decision
# was for), because their own `deployment` tag names the controller, not a replica.
REPLICA = 'deployment=~"$deployment",application=~"$application"'
CONTROLLER = 'target=~"$deployment",application=~"$application"'
APP = 'application=~"$application"'
WINDOW = "$__rate_interval"

# Serve's own metrics the dashboard reads (checked against the installed ray in the tests).
SERVE_METRICS = (
    "ray_serve_num_http_requests_total",
    "ray_serve_num_http_error_requests_total",
    "ray_serve_http_request_latency_ms_bucket",
)


@dataclass(frozen=True)
class Target:
    """One PromQL query of a panel and its legend (Grafana `{{label}}` syntax)."""

    expr: str
    legend: str


@dataclass(frozen=True)
class Panel:
    """A time-series panel: title, what it shows and why, unit, queries."""

    title: str
    description: str
    unit: str
    targets: list[Target]
    stack: bool = False


@dataclass(frozen=True)
class Row:
    """A row of panels about one concern."""

    title: str
    panels: list[Panel] = field(default_factory=list)


def _gauge(metric: str, legend: str) -> Target:
    # max, not sum: a restarted replica's old series linger until stale; they must not add up.
    return Target(f"max by (deployment) ({metric}{{{REPLICA}}})", f"{{{{deployment}}}} {legend}")


def _rate(metric: str, by: str, selector: str = REPLICA) -> str:
    return f"sum by ({by}) (rate({metric}{{{selector}}}[{WINDOW}]))"


def _quantiles(histogram: str) -> list[Target]:
    """p50, p90 and p99 of a histogram over all selected replicas."""
    rate = f"sum by (le) (rate({histogram}_bucket{{{REPLICA}}}[{WINDOW}]))"
    return [
        Target(f"histogram_quantile({q}, {rate})", f"p{round(q * 100)}") for q in (0.5, 0.9, 0.99)
    ]


def _memory_row() -> Row:
    headroom = " - ".join(
        f"max by (deployment) ({m}{{{REPLICA}}})"
        for m in ("ray_rap_budget_bytes", "ray_rap_weight_bytes", "ray_rap_kv_reserved_bytes")
    )
    return Row(
        "Memory",
        [
            Panel(
                "Budget vs weights vs KV",
                "Per replica: the budget, the weight bytes resident, the KV page pool it holds and "
                "the pages rows use. Weights + pool stay under the budget (invariant 2).",
                "bytes",
                [
                    _gauge("ray_rap_budget_bytes", "budget"),
                    _gauge("ray_rap_weight_bytes", "weights"),
                    _gauge("ray_rap_kv_reserved_bytes", "KV pool"),
                    _gauge("ray_rap_kv_in_use_bytes", "KV in use"),
                ],
            ),
            Panel(
                "KV pages and rows",
                "Per replica: KV pages rows hold and pages free (over all kept attention "
                "layers), and the rows running and waiting.",
                "short",
                [
                    _gauge("ray_rap_kv_pages_in_use", "pages in use"),
                    _gauge("ray_rap_kv_pages_free", "pages free"),
                    _gauge("ray_rap_queue_running", "running"),
                    _gauge("ray_rap_queue_waiting", "waiting"),
                ],
            ),
            Panel(
                "Device memory",
                "GPU: NVML's used and free bytes, device-wide (replicas on one GPU share the free "
                "part). CPU: the model's own bytes and the budget left.",
                "bytes",
                [
                    _gauge("ray_rap_device_used_bytes", "used"),
                    _gauge("ray_rap_device_free_bytes", "free"),
                ],
            ),
            Panel(
                "Headroom",
                "Budget minus weights minus reserved KV: what the next batch may use.",
                "bytes",
                [Target(headroom, "{{deployment}}")],
            ),
            Panel(
                "Over budget (high-water mark)",
                "Own bytes above the budget ever seen at admission; anything but 0 is a bug.",
                "bytes",
                [_gauge("ray_rap_over_budget_bytes", "over budget")],
            ),
        ],
    )


def _masks_row() -> Row:
    return Row(
        "Masks",
        [
            Panel(
                "Blocks kept",
                "Attention and MLP blocks the replica's model holds now (of num_layers each).",
                "short",
                [
                    _gauge("ray_rap_attn_blocks_kept", "attention"),
                    _gauge("ray_rap_mlp_blocks_kept", "MLP"),
                ],
            ),
            Panel(
                "Mask version",
                "Epoch (controller restarts) and sequence of the mask in use.",
                "short",
                [
                    _gauge("ray_rap_mask_version_epoch", "epoch"),
                    _gauge("ray_rap_mask_version_seq", "seq"),
                ],
            ),
        ],
    )


def _controller_row() -> Row:
    return Row(
        "Controller",
        [
            Panel(
                "Decisions",
                "New plans per second, by the replica they were for.",
                "ops",
                [
                    Target(
                        _rate("ray_rap_controller_decisions_total", "target", CONTROLLER),
                        "{{target}}",
                    )
                ],
            ),
            Panel(
                "Policy decisions and fallbacks",
                "Bucket masks the controller's policy decided since it started, and those where "
                "the RAP policy ended over budget and mem-greedy planned instead.",
                "short",
                [
                    Target(
                        f"max by (policy) (ray_rap_controller_policy_decisions{{{APP}}})",
                        "{{policy}} decisions",
                    ),
                    Target(
                        f"max by (policy) (ray_rap_controller_policy_fallbacks{{{APP}}})",
                        "{{policy}} fallbacks",
                    ),
                ],
            ),
            Panel(
                "Telemetry reports",
                "Reports per second by replica; fresh=no means the controller saw stale telemetry.",
                "ops",
                [
                    Target(
                        _rate("ray_rap_controller_reports_total", "target, fresh", CONTROLLER),
                        "{{target}} fresh={{fresh}}",
                    )
                ],
            ),
        ],
    )


def _admission_row() -> Row:
    on_controller = f'ray_rap_steps_total{{source="controller",{REPLICA}}}'
    every = f"ray_rap_steps_total{{{REPLICA}}}"
    share = f"sum(rate({on_controller}[{WINDOW}])) / sum(rate({every}[{WINDOW}]))"
    return Row(
        "Admission",
        [
            Panel(
                "Refusals by reason",
                "Requests refused per second (503 with Retry-After), by reason.",
                "reqps",
                [Target(_rate("ray_rap_admissions_refused_total", "reason"), "{{reason}}")],
            ),
            Panel(
                "Steps by mask source",
                "Engine steps per second run on a controller plan's mask or a local fallback.",
                "ops",
                [Target(_rate("ray_rap_steps_total", "source"), "{{source}}")],
                stack=True,
            ),
            Panel(
                "Local fallback steps",
                "Steps run on a pruned mask the replica planned itself, since it started.",
                "short",
                [_gauge("ray_rap_local_fallback_steps", "fallbacks")],
            ),
            Panel(
                "Share of steps on controller masks",
                "Steps on controller-planned masks over all steps: low means plans miss the load.",
                "percentunit",
                [Target(share, "controller share")],
            ),
            Panel(
                "Queue",
                "Requests waiting for a batch, per replica.",
                "short",
                [_gauge("ray_rap_queue_waiting", "waiting")],
            ),
            Panel(
                "Preemptions",
                "Rows preempted by recompute since start (the KV pool was cut under them).",
                "short",
                [_gauge("ray_rap_preemptions", "preempted")],
            ),
            Panel(
                "Contained errors",
                "Errors a replica contained and served on since it started (device_memory: NVML "
                "failing; plan: a malformed plan; telemetry: the reporter).",
                "short",
                [
                    Target(
                        f"max by (deployment, kind) (ray_rap_replica_errors{{{REPLICA}}})",
                        "{{deployment}} {{kind}}",
                    )
                ],
            ),
        ],
    )


def _latency_row() -> Row:
    serve = (
        f"histogram_quantile(0.99, sum by (le) "
        f"(rate(ray_serve_http_request_latency_ms_bucket{{{APP}}}[{WINDOW}])))"
    )
    return Row(
        "Latency",
        [
            Panel(
                "Time to first token",
                "TTFT quantiles.",
                "s",
                _quantiles("ray_rap_time_to_first_token_seconds"),
            ),
            Panel(
                "Time per output token",
                "TPOT quantiles (after the first token).",
                "s",
                _quantiles("ray_rap_time_per_output_token_seconds"),
            ),
            Panel(
                "End-to-end latency",
                "Request latency inside the replica, quantiles.",
                "s",
                _quantiles("ray_rap_request_latency_seconds"),
            ),
            Panel(
                "HTTP latency at the Serve proxy",
                "p99 seen by clients (Serve's metric).",
                "ms",
                [Target(serve, "p99 HTTP")],
            ),
        ],
    )


def _throughput_row() -> Row:
    return Row(
        "Throughput",
        [
            Panel(
                "Tokens per second",
                "Generated tokens per second per replica (counter rate; the gauge is the "
                "replica's own last-period figure).",
                "short",
                [
                    Target(_rate("ray_rap_generated_tokens_total", "deployment"), "{{deployment}}"),
                    _gauge("ray_rap_tokens_per_second", "gauge"),
                ],
            ),
            Panel(
                "HTTP requests by status",
                "Requests per second at the Serve proxy, by status code.",
                "reqps",
                [
                    Target(
                        _rate("ray_serve_num_http_requests_total", "status_code", APP),
                        "{{status_code}}",
                    )
                ],
                stack=True,
            ),
            Panel(
                "HTTP errors by code",
                "Error responses per second at the Serve proxy (4xx and 5xx).",
                "reqps",
                [
                    Target(
                        _rate("ray_serve_num_http_error_requests_total", "error_code", APP),
                        "{{error_code}}",
                    )
                ],
                stack=True,
            ),
        ],
    )


def rows() -> list[Row]:
    """The dashboard's rows, top to bottom."""
    return [
        _memory_row(),
        _masks_row(),
        _controller_row(),
        _admission_row(),
        _latency_row(),
        _throughput_row(),
    ]
