"""The reliability campaign's load: a locust file, run headless in its own process.

`rap campaign` starts `locust -f <this file> --headless --host URL` (gevent patches that process
only) with its settings in the environment:

    RAP_CAMPAIGN_OUT      folder for requests-<pid>.jsonl, one line per request (below)
    RAP_CAMPAIGN_SHAPE    JSON [[until_s, users], ...]: the users from the previous step's end
                          until `until_s` seconds of run time; the run ends after the last step
    RAP_CAMPAIGN_PACING_S each user starts a request every so many seconds (closed loop: later
                          if its last request took longer), its first one after a random
                          part of that (so that users spawned together do not stay in step)
    RAP_CAMPAIGN_MODEL    the served model's name;  RAP_API_KEY  the API key, if any

Each request is written twice: `{"id", "phase": "sent"}` before it is sent, its outcome
(`"phase": "done"`) after, so that a request never answered shows as lost. Each user sends
streaming completions (1 in 4 not streamed; 1 in 20 invalid on purpose: a
negative `max_tokens`, which must be a 400) and classifies every answer by what a client sees
(`rap.ops.campaign.OUTCOMES`): `ok` (200, a finish reason, then [DONE]); `error_event` (200,
then an error event in OpenAI's shape: a replica failed mid-request); `4xx`; `503` (with
Retry-After); `503_no_retry_after`, `5xx`, `cut` (the stream ended without [DONE] or a body that
is not a completion), `hung` (no byte for `READ_TIMEOUT_S`), `connect_error`. Every recorded
request is also one of locust's (a success or a failure of its statistics), so that the judge
can hold locust's count to the records'.
"""

from __future__ import annotations

import json
import os
import random
import time
import uuid
from pathlib import Path
from typing import Any

from locust import HttpUser, LoadTestShape, task

from rap.ops.campaign import classify_stream

READ_TIMEOUT_S = 120.0
# 6 to 9 tokens each, ≤ 24 asked: the judge tells the disconnect storm's rows from these by the
# KV pages they hold (`rap.ops.campaign_checks.ROW_TOKENS_MAX`), so keep them short.
PROMPTS = (
    "The history of the printing press",
    "Write a short note about rivers.",
    "List three uses of copper:",
    "Once upon a time in a small village,",
    "Explain what a compiler does.",
    "The weather today is",
)


def _record(out: dict[str, Any]) -> None:
    folder = Path(os.environ["RAP_CAMPAIGN_OUT"])
    with open(folder / f"requests-{os.getpid()}.jsonl", "a") as f:
        f.write(json.dumps(out) + "\n")


PACING_S = float(os.environ.get("RAP_CAMPAIGN_PACING_S", "4"))
RECHECK_S = 0.5
"""Seconds an idle user waits before it looks at the shape's level again."""
LIVE: list[Client] = []
"""This process's users in the order they started: the first `target_users` of them send.
Locust lowers the user count slowly: with a stop timeout it stops users a batch at a time and
waits for each batch's requests to end (a 4 x burst took 55 s to fall back to the base load),
so users above the level stop sending at once instead, whichever of them locust stops."""


def target_users(run_time_s: float) -> int | None:
    """Users the shape (RAP_CAMPAIGN_SHAPE: [[until_s, users], ...]) asks for at a run time;
    None once it has ended."""
    steps = json.loads(os.environ.get("RAP_CAMPAIGN_SHAPE", "[[60, 1]]"))
    return next((int(users) for until_s, users in steps if run_time_s < until_s), None)


class Client(HttpUser):
    started_s = 0.0
    """perf_counter() when this user's last request began: the next begins PACING_S after it
    (locust's constant_pacing paces from the user's creation instead, which would put users back
    in step after their random first wait)."""

    def wait_time(self) -> float:
        return max(0.0, self.started_s + PACING_S - time.perf_counter())

    def on_start(self) -> None:
        key = os.environ.get("RAP_API_KEY")
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.rng = random.Random(os.getpid() * 1000 + id(self) % 1000)
        # Users spawned together and paced alike would stay in step: a wave of every user's
        # request each PACING_S instead of users / PACING_S a second. A random phase spreads
        # them from the first request on (gevent's sleep: other users run meanwhile).
        time.sleep(self.rng.uniform(0.0, PACING_S))
        LIVE.append(self)

    def on_stop(self) -> None:
        if self in LIVE:
            LIVE.remove(self)

    def above_level(self) -> bool:
        """Whether this user is beyond the users the shape asks for now (`LIVE`)."""
        shape = self.environment.shape_class
        level = target_users(shape.get_run_time()) if shape is not None else None
        return self in LIVE and level is not None and LIVE.index(self) >= level

    @task
    def complete(self) -> None:
        if self.above_level():  # idle, and look again soon: a burst may come back
            self.started_s = time.perf_counter() - PACING_S + RECHECK_S
            return
        self.started_s = time.perf_counter()
        stream = self.rng.random() >= 0.25
        body = {
            "model": os.environ.get("RAP_CAMPAIGN_MODEL", "SmolLM2-135M-Instruct"),
            "prompt": self.rng.choice(PROMPTS),
            "max_tokens": self.rng.choice((8, 16, 24)),
            "temperature": 0.7,
            "stream": stream,
        }
        invalid = self.rng.random() < 0.05
        if invalid:
            body["max_tokens"] = -1
        t0 = time.time()
        rid = uuid.uuid4().hex[:16]
        _record({"id": rid, "phase": "sent", "t": t0})  # a request without its answer is lost
        out: dict[str, Any] = {"id": rid, "phase": "done", "t": t0, "stream": stream}
        out["invalid"] = invalid
        name = "stream" if stream else "whole"
        try:
            with self.client.post(
                "/v1/completions",
                json=body,
                headers=self.headers,
                stream=stream,
                timeout=(10.0, READ_TIMEOUT_S),
                catch_response=True,
                name=name,
            ) as resp:
                out["status"] = resp.status_code
                out["retry_after"] = resp.headers.get("Retry-After")
                try:  # a stream that fails while read is still one of locust's requests
                    _classify(resp, t0, out)
                except Exception as exc:
                    _failed(exc, out)
                if out["outcome"] in ("ok", "4xx", "503"):
                    resp.success()
                else:
                    resp.failure(out["outcome"])
        except Exception as exc:  # every failure is a record, never a lost one
            _failed(exc, out)
        out["e2e_s"] = time.time() - t0
        _record(out)


def _failed(exc: BaseException, out: dict[str, Any]) -> None:
    text = f"{type(exc).__name__}: {exc}"
    hung = "timed out" in text.lower() or "timeout" in type(exc).__name__.lower()
    out.update(outcome="hung" if hung else "connect_error", error=text[:300])


def _classify(resp: Any, t0: float, out: dict[str, Any]) -> None:
    status = resp.status_code
    if status == 0:  # locust's session caught the request's failure (no response at all)
        _failed(resp.error, out)
    elif status == 200:
        if out["stream"]:
            classify_stream(resp.iter_lines(), t0, out)
        else:
            body = resp.json()
            out["outcome"] = "ok" if body.get("choices") else "cut"
            out["ttft_s"] = time.time() - t0
    elif status == 503:
        out["outcome"] = "503" if out["retry_after"] else "503_no_retry_after"
    elif 400 <= status < 500:
        out["outcome"] = "4xx"
        out["error_code"] = (resp.json().get("error") or {}).get("code")
    else:
        out["outcome"] = "5xx"
        out["error"] = resp.text[:300]


class Shape(LoadTestShape):
    """Users over run time from RAP_CAMPAIGN_SHAPE (module doc)."""

    def tick(self) -> tuple[int, float] | None:
        users = target_users(self.get_run_time())
        if users is None:
            return None
        return users, max(float(users), 1.0)  # reach each level within a second
