"""Serve's proxy gets time to start on a loaded machine (rap.ops.ray_env)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from rap.ops.ray_env import PATIENT_SERVE_ENV, patient_serve_env


def test_the_patient_values_are_set_and_a_users_own_are_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in PATIENT_SERVE_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S", "7")
    held = patient_serve_env()
    assert held["RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S"] == "60"
    assert os.environ["RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S"] == "7"


def test_serve_reads_them_under_these_names() -> None:
    """The names are Ray Serve's own: an upgrade that renames one fails here, not on a busy CI."""
    code = (
        "import json; from ray.serve._private import constants as c; "
        "print(json.dumps([c.PROXY_READY_CHECK_TIMEOUT_S, c.PROXY_HEALTH_CHECK_TIMEOUT_S]))"
    )
    env = {**os.environ, **PATIENT_SERVE_ENV}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [60.0, 30.0]
