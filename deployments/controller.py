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
from rap.serving.config import ServeAppConfig, controller_policy
from rap.serving.controller import Controller
from rap.serving.messages import Telemetry

log = logging.getLogger("ray.serve")


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
class RapController:
    def __init__(self, app_config: dict[str, Any]) -> None:

        cfg = ServeAppConfig.model_validate(app_config).resolved()
        self.policy = controller_policy(cfg)
        self.core = Controller(planner=self.policy, config=cfg.controller)
        self.metrics = ControllerMetrics()
        self._record_policy()
        log.info("RAP controller up: %s", _describe(self.policy.describe()))

    async def report(self, telemetry: dict[str, Any]) -> dict[str, Any] | None:
        """A replica's telemetry in; its new plan out (None when nothing changed)."""
        tel = Telemetry.model_validate(telemetry)
        stale = time.time() - tel.timestamp_s > self.core.config.stale_after_s
        self.metrics.reports.inc(tags={"target": tel.replica, "fresh": "no" if stale else "yes"})
        plan = self.core.report(tel)
        self._record_policy()
        if plan is None:
            return None
        self.metrics.decisions.inc(tags={"target": tel.replica})
        log.info(
            "plan %s for %s by %s", plan.version, tel.replica, _describe(self.policy.describe())
        )
        return plan.model_dump(mode="json")

    def _record_policy(self) -> None:
        d = self.policy.describe()
        self.metrics.policy_decisions.set(d["decisions"], tags={"policy": d["kind"]})
        self.metrics.policy_fallbacks.set(d["fallbacks"], tags={"policy": d["kind"]})

    async def state(self) -> dict[str, Any]:
        out = self.core.state()
        out["policy"] = self.policy.describe()
        return out


def _describe(policy: dict[str, Any]) -> str:
    """One log line: kind, origin, decisions and fallbacks."""
    return (
        f"{policy['kind']} ({policy['origin']}): {policy['decisions']} decisions, "
        f"{policy['fallbacks']} fallbacks"
    )
