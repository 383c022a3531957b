"""The campaign's harness without the app: its load (`rap.cli.campaign.run_locust` running
`rap.ops.locustfile`, a real locust process for a few seconds) against a stub of the completions
endpoint, where locust's own count of requests is the records' count, which the judge requires;
and what the drills hand the judge (`rap.cli.drills`). No Ray, no model."""

from __future__ import annotations

import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from rap.cli.campaign import capacity, run_locust
from rap.cli.drills import REPLICAS, Harness, idle_check
from rap.ops import campaign
from rap.ops.campaign import Observed, Plan

CHUNK_S = 0.05
"""Seconds between a stub stream's chunks: requests are still streaming when the run ends."""


class Stub(BaseHTTPRequestHandler):
    """POST /v1/completions as the app answers it: 400 for a negative max_tokens, else a
    completion (streamed: a chunk per token, the finish, [DONE])."""

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    def _send(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:
        ask = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if ask["max_tokens"] < 0:
            self._send(400, {"error": {"message": "max_tokens < 0", "code": "invalid_value"}})
            return
        n = min(int(ask["max_tokens"]), 6)
        if not ask.get("stream"):
            time.sleep(n * CHUNK_S)
            self._send(200, {"choices": [{"text": "a" * n, "finish_reason": "length"}]})
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()  # HTTP/1.0: the body ends when the connection closes
        for i in range(n):
            time.sleep(CHUNK_S)
            reason = "length" if i == n - 1 else None
            chunk = {"choices": [{"text": "a", "finish_reason": reason}]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()
        self.wfile.write(b"data: [DONE]\n\n")


@pytest.fixture
def stub_url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Stub)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_locust_counts_every_request_the_records_hold(stub_url: str, tmp_path: Path) -> None:
    """Locust's CSV is rewritten once a second while it runs: the requests of its last second
    were missing from the count the campaign read (5,162 against 5,164 records in the 10-minute
    run). The count now comes from its statistics once every user has stopped."""
    h = Harness(stub_url, "admin", "key", tmp_path / "faults")
    plan = Plan(duration_s=4.0, capacity_rps=8.0, pacing_s=0.25)  # 1 user, bursts of 8
    counted = run_locust(h, plan.shape(), plan.pacing_s, tmp_path, timeout_s=60)
    lines = campaign.read_records(tmp_path)
    done = [r for r in lines if r["phase"] == "done"]
    assert len(done) > 8 and {r["outcome"] for r in done} <= {"ok", "4xx"}, done
    assert counted == len(done)
    result = campaign.judge(lines, counted, Observed(), {}, h.t0, plan)
    assert next(c for c in result["cases"] if c["case"] == "none lost")["ok"]


def test_capacity_is_the_campaigns_own_mix_in_a_closed_loop(stub_url: str, tmp_path: Path) -> None:
    """Capacity was measured with one short prompt, not streamed, from threads of the harness:
    8.67 requests/s, against which the base load (0.7 ×) kept both replicas saturated once
    locust's mix and process were added. Now locust itself runs the mix without pauses. The
    stub answers a user's request in about 6 × CHUNK_S (max_tokens ≥ 8, capped at 6 chunks), so
    4 users complete at most 4 / (6 × CHUNK_S) ≈ 13 a second, and a run with no pause between
    requests comes near it; the answers stay out of the run's own records."""
    h = Harness(stub_url, "admin", "key", tmp_path / "faults")
    rate = capacity(h, 4.0, clients=4, out=tmp_path)
    assert 4.0 < rate <= 4 / (6 * CHUNK_S) * 1.1, rate  # a pacing of seconds would give < 4
    assert not list(tmp_path.glob("requests-*.jsonl"))
    assert list((tmp_path / "capacity").glob("requests-*.jsonl"))


def test_a_capacity_run_with_too_few_answers_is_measured_again_for_longer(
    stub_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """On a machine loaded 5 x, a 10-s capacity run counted no answer, and the campaign ran a
    plan for 0 requests/s. A run that counts fewer than MIN_CAPACITY_ANSWERS measures again over
    twice the time: 4 users answered in ~0.3 s each count about 9 over the last 2/3 of 1.2 s,
    then about 18 over 2.4 s."""
    h = Harness(stub_url, "admin", "key", tmp_path / "faults")
    rate = capacity(h, 1.2, clients=4, out=tmp_path)
    said = capsys.readouterr().out
    assert "fewer than 16; measuring again over 2.4 s" in said, said
    assert 4.0 < rate <= 4 / (6 * CHUNK_S) * 1.1, rate


def test_users_spawned_together_do_not_send_in_step(stub_url: str, tmp_path: Path) -> None:
    """The base load's users were spawned within a second and paced alike, so they sent in
    waves: every user's request at once, each pacing period (52 requests within a second, then
    none for 15 s). Each user's first request now waits a random part of the pacing. 16 users,
    one request each per 4 s for 8 s: at most half of them start within any half second (in
    step, all 16 started within 0.01 s)."""
    h = Harness(stub_url, "admin", "key", tmp_path / "faults")
    run_locust(h, [[8.0, 16]], 4.0, tmp_path, timeout_s=60)  # two requests a user
    sent = sorted(r["t"] for r in campaign.read_records(tmp_path) if r["phase"] == "sent")
    busiest = max(sum(t <= s < t + 0.5 for s in sent) for t in sent)
    assert len(sent) >= 24 and busiest <= 8, [round(t - sent[0], 2) for t in sent]


def test_users_above_the_shapes_level_stop_sending_at_once(stub_url: str, tmp_path: Path) -> None:
    """Locust lowers its user count slowly (a batch at a time, waiting for each batch's
    requests: a burst of 227 users took 55 s to fall back to 40). The users above the level
    stop sending at once: 12 users for 3 s, then 2, one request a second each: over 4.5–8 s
    after the first request, about 2 a second are sent (ramping down, locust's own users sent
    about 24 there)."""
    h = Harness(stub_url, "admin", "key", tmp_path / "faults")
    run_locust(h, [[3.0, 12], [9.0, 2]], 1.0, tmp_path, timeout_s=60)
    sent = sorted(r["t"] for r in campaign.read_records(tmp_path) if r["phase"] == "sent")
    late = [t - sent[0] for t in sent if 4.5 <= t - sent[0] < 8.0]
    assert 4 <= len(late) <= 11, [round(t - sent[0], 2) for t in sent]


def test_the_idle_check_keeps_the_storms_span_for_the_judge(tmp_path: Path) -> None:
    """It rebuilt the storm's result without `until` (the last hang-up), from which the judge
    counts the steps its rows took to go."""
    h = Harness("http://127.0.0.1:9", "admin", "key", tmp_path)
    idle = {"queue": {"running": 0}, "kv_pages_in_use": 0}
    h.obs.samples = [{"t": 80.0, "replicas": dict.fromkeys(REPLICAS, idle)}]
    storm = {"t": 70.0, "until": 73.0, "ok": True, "detail": "40 clients hung up"}
    got = idle_check(h, storm)
    assert got["ok"] and (got["t"], got["until"]) == (70.0, 73.0)
    assert got["detail"].startswith("40 clients hung up; after the load, pages held: none")


def test_ctrl_c_stops_ray_puts_the_environment_back_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Interrupted while it starts (or runs), the campaign exits 130 with one line, no
    traceback; Ray is stopped and the keys it set for Ray's workers are gone again."""
    import rap.cli.bench as bench
    from rap.cli.main import main

    stopped: list[bool] = []

    def interrupted(port: int) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(bench, "_start_ray", interrupted)
    monkeypatch.setattr(bench, "_stop_ray", lambda: stopped.append(True))
    monkeypatch.delenv("RAP_API_KEY", raising=False)
    assert main(["campaign", "--duration", "60", "--out", str(tmp_path)]) == 130
    assert stopped == [True]
    assert "RAP_API_KEY" not in os.environ
    assert "interrupted, nothing judged" in capsys.readouterr().err
