"""Typed configuration of a RAP Serve application, validated where it is built.

`ServeAppConfig` is what `deployments/serve_config.yaml` passes as the application's `args`,
and what `rap serve` builds from its flags. Secrets are never part of it: the admin token and
the API key are read from environment variables whose names it holds (a Kubernetes Secret sets
them), so a config file can be committed and printed safely.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from rap.core.loading import load_config
from rap.planning import SERVING_PLANNERS, build_policy, choose_policy
from rap.planning.search import SEARCHES
from rap.serving.controller import ControllerConfig
from rap.serving.engine import EngineConfig
from rap.serving.http_guard import HttpConfig


class ReplicaConfig(BaseModel):
    """One model replica (a Serve deployment of its own, so operators can address it)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-z][a-z0-9-]{0,39}$", description="Stable name, e.g. replica-0.")
    budget_gib: float | None = Field(
        None,
        gt=0,
        description="Bytes the model may hold (GiB). None: from the device (NVML on a "
        "GPU; on a CPU the dense model's peak at the engine's largest batch and 1,024 tokens).",
    )
    num_cpus: float = Field(0.5, ge=0, description="Ray CPUs reserved (fractional on small hosts).")
    num_gpus: float = Field(0.0, ge=0, description="Ray GPUs (fractions share one device).")


class ServeAppConfig(BaseModel):
    """The whole application: model, replicas, batching, controller, access."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field("smollm2", description="Model name, folder or hub id for every replica.")
    served_name: str | None = Field(
        None, description="Model name clients send in requests; default: the model's identity."
    )
    dtype: Literal["float32", "float16", "bfloat16"] | None = Field(
        None, description="Serving dtype; default float32 on CPU, float16 on GPU."
    )
    device: Literal["cpu", "cuda"] | None = Field(None, description="Default: cuda if present.")
    replicas: list[ReplicaConfig] = Field(
        default_factory=lambda: [ReplicaConfig(name="replica-0")], min_length=1
    )
    engine: EngineConfig = Field(default_factory=EngineConfig)
    controller: ControllerConfig = Field(default_factory=ControllerConfig)
    http: HttpConfig = Field(default_factory=HttpConfig)
    drain_timeout_s: float = Field(
        30.0,
        gt=0,
        description="On shutdown or redeploy, how long running requests may take to finish "
        "(Serve's graceful_shutdown_timeout_s for every deployment); new ones go elsewhere.",
    )
    planner: str = Field(
        "mem-greedy",
        description="Planner for replicas' local fallback, and the controller's when `policy` "
        "is null: a stored-score planner (rap.planning.planners.SERVING_PLANNERS) or search on "
        "the perplexity surrogate (surrogate-greedy, surrogate-beam, surrogate-milp).",
    )
    policy: str | None = Field(
        "default",
        description="The controller's policy: 'default' (for the default model, search on the "
        "surrogate, surrogate-greedy, which beat the RAP policy on the test split; for other "
        "models the `planner`), 'rap' (the RAP policy shipped for the default model), a path "
        "to an exported policy from `rap train`, or None for the `planner`.",
    )
    telemetry_period_s: float = Field(0.5, gt=0, description="Replica → controller period.")
    gpu_margin_gib: float = Field(1.0, ge=0, description="NVML free memory kept in reserve.")
    num_threads: int = Field(1, ge=1, description="torch threads per replica.")
    admin_token_env: str = Field(
        "RAP_ADMIN_TOKEN", description="Env var holding the admin bearer token; unset: admin off."
    )
    api_key_env: str = Field(
        "RAP_API_KEY", description="Env var holding the API key for /v1; unset: no key needed."
    )

    @field_validator("planner")
    @classmethod
    def _known_planner(cls, value: str) -> str:

        if value not in (*SERVING_PLANNERS, *SEARCHES):
            known = ", ".join((*SERVING_PLANNERS, *SEARCHES))
            raise ValueError(f"unknown planner {value!r}; expected one of {known}")
        return value

    @model_validator(mode="after")
    def _unique_names(self) -> ServeAppConfig:
        names = [r.name for r in self.replicas]
        if len(set(names)) != len(names):
            raise ValueError(f"replica names must be unique, got {names}")
        return self

    @model_validator(mode="after")
    def _one_step(self) -> ServeAppConfig:
        """The controller prices the same step the replicas run (one byte accounting)."""
        if self.controller.step_tokens is None:
            steps = {"step_tokens": self.engine.max_step_tokens}
            self.controller = self.controller.model_copy(update=steps)
        return self

    def resolved(self) -> ServeAppConfig:
        """Device and dtype made explicit, so that the controller plans in the replicas' dtype:
        cuda when a replica asks for a GPU; float16 on a GPU, float32 on a CPU."""
        device = self.device or ("cuda" if any(r.num_gpus > 0 for r in self.replicas) else "cpu")
        dtype = self.dtype or ("float16" if device == "cuda" else "float32")
        return self.model_copy(update={"device": device, "dtype": dtype})


def controller_policy(cfg: ServeAppConfig) -> Any:
    """The controller's policy for a resolved config (`rap.planning.choose_policy`), loaded: what
    the controller deployment runs, and what `rap serve` and `build_app` load once before
    anything is deployed, so that a policy that cannot load is one error line up front."""

    model_config, model_id = load_config(cfg.model)
    choice = choose_policy(cfg.policy, cfg.planner, model_id)
    return build_policy(
        choice, model_config, model_id, cfg.dtype, cfg.planner, cfg.engine.min_kept_fraction
    )
