"""`rap serve` as a user runs it: a Ray of its own, the first answer, a clean stop on SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow


def test_serve_answers_then_stops_cleanly_on_sigterm(tmp_path) -> None:
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        cmd = [sys.executable, "-m", "rap.cli", "serve", "--port", "8123"]
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.monotonic() + 300
            while "operator: rap budget set" not in log.read_text():
                assert proc.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(1)
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
    text = log.read_text()
    assert "'The capital of France is Paris.'" in text
    assert rc == 0 and "RAP Serve stopped" in text, text[-3000:]
    assert "SIGTERM received" not in text  # Ray's abort handler did not run
