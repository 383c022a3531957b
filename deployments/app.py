"""The RAP Serve application: controller, replicas and router, bound together.

`serve run deployments/serve_config.yaml` (or `serve deploy`) calls `build_app` with the YAML's
`args`; `rap serve` calls it with the flags' config.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from deployments.controller import RapController
from deployments.replica import LLMReplica
from deployments.router import Router
from rap.serving.config import ServeAppConfig, controller_policy


def build_app(args: dict[str, Any]) -> Application:
    """Validate the config (resolving device and dtype once), load the controller's policy once
    (so that one that cannot load fails here, with one error, not inside a deployment), and
    bind the deployments. A replica takes as many requests as its engine runs and queues, so
    the engine's own queue bound (a 503 with Retry-After) is what a flood meets. On shutdown
    or redeploy Serve stops routing to a replica and lets its running requests finish for up
    to `drain_timeout_s` (graceful drain)."""
    cfg = ServeAppConfig.model_validate(args).resolved()
    controller_policy(cfg)
    raw = cfg.model_dump(mode="json")
    controller = RapController.bind(raw)  # type: ignore[attr-defined]
    replicas = {
        r.name: LLMReplica.options(  # type: ignore[attr-defined]
            name=r.name,
            ray_actor_options={"num_cpus": r.num_cpus, "num_gpus": r.num_gpus},
            max_ongoing_requests=cfg.engine.max_batch_size + cfg.engine.max_waiting + 1,
            max_queued_requests=cfg.engine.max_waiting,
            graceful_shutdown_timeout_s=cfg.drain_timeout_s,
        ).bind(raw, r.name, controller)
        for r in cfg.replicas
    }
    router = Router.options(graceful_shutdown_timeout_s=cfg.drain_timeout_s)  # type: ignore[attr-defined]
    return router.bind(raw, controller, replicas)  # type: ignore[no-any-return]
