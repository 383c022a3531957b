"""Environment a local Ray cluster with Serve needs on a loaded machine, set before `ray.init`.

Serve's controller kills its HTTP proxy when the proxy has not reported ready within
`RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S` (5 s by default) three checks in a row, and
`serve.start` then fails with "the actor is dead because it was killed by `ray.kill`... it was
cancelled before it started running". On two cores beside another job the proxy's imports
alone take longer, so every Serve test of a CI run on a busy machine failed that way. The
cluster's processes inherit the driver's environment, so setting these before `ray.init` is
enough; a value the user set is kept.
"""

from __future__ import annotations

import os

PATIENT_SERVE_ENV = {
    "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60",
    "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "30",
}
"""Seconds Serve's controller waits for its proxy to start and to answer a health check."""


def patient_serve_env() -> dict[str, str]:
    """Set `PATIENT_SERVE_ENV` where the environment does not already say; returns what holds."""
    for name, value in PATIENT_SERVE_ENV.items():
        os.environ.setdefault(name, value)
    return {name: os.environ[name] for name in PATIENT_SERVE_ENV}
