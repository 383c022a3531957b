"""RapController: the application's one controller, a Serve deployment of its own.

A Serve deployment (not a bare actor) so that Serve health-checks it and restarts it when it
dies, and replicas reach it through an ordinary handle. It holds the policy (inference only) and
the latest telemetry per replica; a replica's telemetry call gets its MaskPlan in reply.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from ray import serve

from deployments.metrics import ControllerMetrics
from rap.config import ServeAppConfig
from rap.controller import Controller
from rap.messages import Telemetry

log = logging.getLogger("ray.serve")


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
class RapController:
    def __init__(self, app_config: dict[str, Any]) -> None:
        from rap.loading import load_config
        from rap.policy import HeuristicPolicy

        cfg = ServeAppConfig.model_validate(app_config).resolved()
        model_config, model_id = load_config(cfg.model)
        self.policy = HeuristicPolicy(
            model_config, model_id, cfg.dtype, cfg.planner, cfg.engine.min_kept_fraction
        )
        self.core = Controller(planner=self.policy.for_bucket, config=cfg.controller)
        self.metrics = ControllerMetrics()
        log.info("RAP controller up: %s over %s", type(self.policy).__name__, model_id)

    async def report(self, telemetry: dict[str, Any]) -> dict[str, Any] | None:
        """A replica's telemetry in; its new plan out (None when nothing changed)."""
        tel = Telemetry.model_validate(telemetry)
        stale = time.time() - tel.timestamp_s > self.core.config.stale_after_s
        self.metrics.reports.inc(tags={"target": tel.replica, "fresh": "no" if stale else "yes"})
        plan = self.core.report(tel)
        if plan is None:
            return None
        self.metrics.decisions.inc(tags={"target": tel.replica})
        return plan.model_dump(mode="json")

    async def state(self) -> dict[str, Any]:
        out = self.core.state()
        out["policy"] = {
            "kind": type(self.policy).__name__,
            "decisions": getattr(self.policy, "decisions", None),
            "fallbacks": getattr(self.policy, "fallbacks", None),
            "last_fallback": getattr(self.policy, "last_fallback", None),
        }
        return out


def _wants_rap_policy(policy: str | None, model_id: str) -> bool:
    """A configured path always; 'default' only where a policy ships for this model."""
    from rap.loading import DEFAULT_MODEL_ID
    from rap.policy import DEFAULT_POLICY_DIR

    if policy is None:
        return False
    if policy != "default":
        return True
    return model_id == DEFAULT_MODEL_ID and DEFAULT_POLICY_DIR.is_dir()
