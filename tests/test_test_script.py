"""scripts/test.sh, CI's test run, on a copy whose tools are stand-ins: every tier runs even when
one fails, each tier's summary is printed, the exit status says whether any failed, and each
tier passes its per-test time limit. And that limit is real: pytest-timeout ends a test that
waits forever (a request whose terminal event was lost)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FAKE_PYTHON = """#!/usr/bin/env bash
echo "$*" >> "$CALLS"
case "$*" in
  *"-m pip"*) exit 0 ;;
  *"not slow and not gpu"*) echo "5 passed in 1.00s"; exit 0 ;;
  *"slow and not gpu"*) echo "1 failed, 3 passed in 1.00s"; exit "$SLOW_RC" ;;
  *) echo "5 passed in 1.00s"; exit 0 ;;
esac
"""


def run_test_sh(
    tmp_path: Path, lint_rc: int, slow_rc: int
) -> tuple[subprocess.CompletedProcess, list[str]]:
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts/test.sh", tmp_path / "scripts/test.sh")
    (tmp_path / "scripts/lint.sh").write_text(f"echo 'lint: stand-in'\nexit {lint_rc}\n")
    python = tmp_path / ".venv/bin/python"
    python.parent.mkdir(parents=True)
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    calls = tmp_path / "calls.txt"
    env = {"PATH": "/usr/bin:/bin", "CALLS": str(calls), "SLOW_RC": str(slow_rc)}
    run = subprocess.run(
        ["bash", str(tmp_path / "scripts/test.sh")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    return run, calls.read_text().splitlines()


def test_every_tier_runs_after_a_failure_and_the_run_fails(tmp_path: Path) -> None:
    run, calls = run_test_sh(tmp_path, lint_rc=1, slow_rc=1)
    assert run.returncode != 0, run.stdout
    pytest_calls = [c for c in calls if "-m pytest" in c]
    assert len(pytest_calls) == 3, calls  # fast, slow and the oldest transformers' fast tier
    assert any("-m pip install" in c and "constraints-oldest.txt" in c for c in calls), calls
    summary = run.stdout.split("== summary\n", 1)[1].splitlines()
    assert summary == [
        "lint: FAILED (exit 1): lint: stand-in",
        "fast: ok: 5 passed in 1.00s",
        "slow: FAILED (exit 1): 1 failed, 3 passed in 1.00s",
        "oldest-transformers: ok: 5 passed in 1.00s",
    ]


def test_each_tier_has_its_per_test_time_limit_and_a_clean_run_passes(tmp_path: Path) -> None:
    run, calls = run_test_sh(tmp_path, lint_rc=0, slow_rc=0)
    assert run.returncode == 0, run.stdout + run.stderr
    fast, slow, oldest = [c for c in calls if "-m pytest" in c]
    assert "not slow and not gpu" in fast and "--timeout 300" in fast
    assert "not slow" not in slow and "--timeout 900" in slow
    assert "not slow and not gpu" in oldest and "--timeout 300" in oldest


def test_the_suite_runs_under_a_per_test_time_limit(pytestconfig: pytest.Config) -> None:
    assert pytestconfig.pluginmanager.hasplugin("timeout")
    assert float(pytestconfig.getini("timeout")) > 0  # pyproject's default, when no tier sets one


def test_a_test_that_waits_forever_is_ended_by_its_time_limit(tmp_path: Path) -> None:
    (tmp_path / "test_waits.py").write_text(
        "import threading\n\n"
        "def test_waits_for_an_event_that_never_comes():\n"
        "    threading.Event().wait()\n"
    )
    (tmp_path / "none.ini").write_text("[pytest]\n")  # not the repository's settings
    pytest_ = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--timeout", "2"]
    ini = ["-c", str(tmp_path / "none.ini"), "--rootdir", str(tmp_path)]
    run = subprocess.run(
        [*pytest_, *ini, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,  # a backstop: without the plugin's limit this pytest would never end
    )
    assert run.returncode == 1, run.stdout + run.stderr
    assert "Timeout" in run.stdout and "1 failed" in run.stdout, run.stdout


class _Item:
    def __init__(self, *markers: pytest.Mark) -> None:
        self.markers = list(markers)

    def get_closest_marker(self, name: str) -> pytest.Mark | None:
        return next((m for m in self.markers if m.name == name), None)

    def add_marker(self, marker: pytest.MarkDecorator) -> None:
        self.markers.append(marker.mark)


class _Config:
    def __init__(self, timeout_s: float | None) -> None:
        self.timeout_s = timeout_s

    def getoption(self, name: str, default: object = None) -> object:
        return self.timeout_s if name == "timeout" else default


def test_slow_tests_get_the_slow_limit_when_no_tier_sets_one() -> None:
    from tests import conftest

    slow, fast, own = _Item(pytest.mark.slow.mark), _Item(), _Item(pytest.mark.slow.mark)
    own.add_marker(pytest.mark.timeout(30))
    conftest.pytest_collection_modifyitems(_Config(None), [slow, fast, own])  # type: ignore[arg-type]
    limit = slow.get_closest_marker("timeout")
    assert limit is not None and limit.args == (conftest.SLOW_TIMEOUT_S,)
    assert fast.get_closest_marker("timeout") is None  # pyproject's default applies
    assert own.get_closest_marker("timeout").args == (30,)  # type: ignore[union-attr]
    tiered = _Item(pytest.mark.slow.mark)
    conftest.pytest_collection_modifyitems(_Config(900.0), [tiered])  # type: ignore[arg-type]
    assert tiered.get_closest_marker("timeout") is None  # scripts/test.sh's --timeout applies
