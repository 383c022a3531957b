"""The router's choice of replica (rap.serving.routing), without Ray."""

from __future__ import annotations

import asyncio

from rap.serving.routing import (
    ReplicaLoad,
    kept_fraction,
    order,
    replica_failed,
    watch,
    worth_retrying,
)
from rap.serving.rows import busy_event


def test_least_loaded_first_then_the_mask_that_keeps_most_then_the_name() -> None:
    loads = {
        "replica-0": ReplicaLoad(inflight=0, kept_fraction=0.72),
        "replica-1": ReplicaLoad(inflight=0, kept_fraction=1.0),
        "replica-2": ReplicaLoad(inflight=1, kept_fraction=1.0),
    }
    assert order(loads) == ["replica-1", "replica-0", "replica-2"]
    loads["replica-1"].inflight = 2
    assert order(loads) == ["replica-0", "replica-2", "replica-1"]
    assert order({"b": ReplicaLoad(), "a": ReplicaLoad()}) == ["a", "b"]


def test_kept_fraction_from_telemetry() -> None:
    assert kept_fraction({"attn_kept": 30, "mlp_kept": 13, "num_layers": 30}) == 43 / 60
    assert kept_fraction({"attn_kept": 0, "mlp_kept": 0}) == 1.0  # unknown depth: as dense


def test_watch_follows_telemetry_and_outlives_a_replica_that_fails() -> None:
    loads = {"ok": ReplicaLoad(), "down": ReplicaLoad(kept_fraction=0.9)}
    seen: list[str] = []

    async def fetch(name: str) -> dict[str, int]:
        seen.append(name)
        if name == "down":
            raise ConnectionError("replica restarting")
        return {"attn_kept": 10, "mlp_kept": 5, "num_layers": 10}

    async def main() -> None:
        task = asyncio.create_task(watch(loads, fetch, period_s=0.01))
        await asyncio.sleep(0.1)
        assert not task.done()
        task.cancel()

    asyncio.run(main())
    assert loads["ok"].kept_fraction == 0.75 and loads["down"].kept_fraction == 0.9
    assert loads["ok"].answered and not loads["down"].answered
    assert seen.count("ok") > 2
    assert loads["down"].failed and loads["down"].failures >= 2 and not loads["ok"].failed
    assert order(loads) == ["ok", "down"]


def test_a_failed_replica_is_routed_to_last_until_its_telemetry_answers() -> None:
    loads = {"a": ReplicaLoad(inflight=0, failed=True), "b": ReplicaLoad(inflight=3)}
    assert order(loads) == ["b", "a"]  # even with more in flight

    async def fetch(_name: str) -> dict[str, int]:
        return {"attn_kept": 10, "mlp_kept": 10, "num_layers": 10}

    async def main() -> None:
        task = asyncio.create_task(watch(loads, fetch, period_s=0.01))
        await asyncio.sleep(0.05)
        task.cancel()

    asyncio.run(main())
    assert not loads["a"].failed and order(loads) == ["a", "b"]


def test_a_replica_that_dies_mid_request_ends_the_stream_with_a_503_event() -> None:
    """Without this the exception aborts the client's response with no word."""
    from rap.serving.routing import relayed

    async def events():
        yield {"type": "start"}
        yield {"type": "token", "text": "Hi"}
        raise RuntimeError("The actor died unexpectedly before finishing this task.")

    load = ReplicaLoad(inflight=1)

    async def main() -> list[dict]:
        return [e async for e in relayed("replica-0", events(), load)]

    out = asyncio.run(main())
    assert [e["type"] for e in out] == ["start", "token", "error"]
    err = out[-1]
    assert err["status"] == 503 and err["retry_after"] == 2 and err["code"] == "replica_failed"
    assert "replica-0" in err["message"] and "RuntimeError" in err["message"]
    assert load.failed and load.failures == 1


def test_a_client_that_goes_away_is_not_a_replica_failure() -> None:
    from rap.serving.routing import relayed

    async def events():
        yield {"type": "token", "text": "a"}
        await asyncio.sleep(10)
        yield {"type": "token", "text": "b"}

    load = ReplicaLoad()

    async def main() -> None:
        async def consume() -> None:
            async for _ in relayed("r", events(), load):
                pass

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.02)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(main())
    assert not load.failed and load.failures == 0


def test_health_is_503_until_every_replica_has_answered() -> None:
    from rap.serving.routing import readiness

    loads = {"replica-0": ReplicaLoad(answered=True), "replica-1": ReplicaLoad()}
    status, body = readiness(loads)
    assert status == 503 and body["status"] == "starting"
    assert body["replicas"] == {"replica-0": "ready", "replica-1": "starting"}
    loads["replica-1"].answered = True
    assert readiness(loads) == (200, {"status": "ok", "replicas": dict.fromkeys(loads, "ready")})


def test_a_503_goes_to_the_next_replica_unless_the_request_waited_it_out() -> None:
    """Waiting `max_wait_s` again on the next replica doubled what a refused client waited
    (~61 s in the reliability campaign); a 503 that came at once is worth the other replica."""
    full = {"type": "error", "status": 503, "code": "queue_full", "message": "the queue is full"}
    assert worth_retrying(full)
    assert worth_retrying(replica_failed("replica-0", RuntimeError("gone")))
    assert not worth_retrying(busy_event(2, "waited 30 s for KV pages"))
    assert not worth_retrying({"type": "error", "status": 400, "message": "too long"})
    assert not worth_retrying({"type": "start"})
