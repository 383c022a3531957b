"""How the router picks a replica for a request (no Ray here; `deployments/router.py` uses it).

Least loaded first: the replica with the fewest requests in flight from this router. On a tie,
the replica whose current mask keeps the largest share of blocks, since it gives the better
answer at the same cost (a replica pruned to fit a small budget is the last choice while an
unpruned one is as free); then by name, so that the order is stable. The share comes from each
replica's telemetry, polled every telemetry period; until a replica has answered, it counts as
dense. A 503 from the first choice is retried once on the second, unless the request already
waited the replica's whole `max_wait_s` for it (code `waited_out`): retrying then doubled what
a refused client waited (~61 s in the reliability campaign, `rap campaign`; docs/results.md).

A replica that fails (its actor died, it restarts, it is stopped and does not answer) is routed
to last until its telemetry answers again, and a request it was running ends with an error
event (`replica_failed`: a 503 the client may retry), never a connection cut without a word.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class ReplicaLoad:
    """What the router knows of one replica."""

    inflight: int = 0
    """Requests this router has sent to it that have not finished."""
    kept_fraction: float = 1.0
    """Share of its 2L blocks its current mask keeps (telemetry; 1.0 until known)."""
    answered: bool = False
    """Whether it has answered a telemetry call: its model is loaded and its engine runs."""
    failed: bool = False
    """Its last call failed or timed out: routed to last until its telemetry answers again."""
    failures: int = 0
    """Calls to it that failed since the router started (requests and telemetry)."""

    def mark_failed(self) -> None:
        self.failed = True
        self.failures += 1

    def heard(self, kept_fraction: float) -> None:
        """Its telemetry answered, with the share of blocks its mask keeps."""
        self.kept_fraction, self.answered = kept_fraction, True

    def recovered(self) -> None:
        self.failed = False


def kept_fraction(telemetry: dict[str, int]) -> float:
    """attn_kept + mlp_kept over all blocks, from a replica's telemetry (as JSON)."""
    kept = telemetry["attn_kept"] + telemetry["mlp_kept"]
    total = telemetry.get("num_layers", 0) * 2
    return kept / total if total else 1.0


def readiness(loads: dict[str, ReplicaLoad]) -> tuple[int, dict[str, Any]]:
    """`/health`: 200 once every replica has answered, else 503 naming those still starting
    (the router answers `/v1/models` before replicas have loaded their models)."""
    replicas = {n: "ready" if v.answered else "starting" for n, v in sorted(loads.items())}
    starting = "starting" in replicas.values()
    return (503 if starting else 200), {
        "status": "starting" if starting else "ok",
        "replicas": replicas,
    }


def order(loads: dict[str, ReplicaLoad]) -> list[str]:
    """Replica names, best first (module doc)."""
    return sorted(
        loads, key=lambda n: (loads[n].failed, loads[n].inflight, -loads[n].kept_fraction, n)
    )


def worth_retrying(first: dict[str, Any]) -> bool:
    """Whether the first choice's first event sends the request to the second choice: a 503
    (memory, a full queue, a failed replica) that came without the request having waited."""
    return first["type"] == "error" and first["status"] == 503 and first.get("code") != "waited_out"


def replica_failed(name: str, exc: BaseException) -> dict[str, Any]:
    """The error event a replica's failure becomes: a 503 with Retry-After (Serve restarts
    the replica; the other replicas answer meanwhile)."""
    return {
        "type": "error",
        "status": 503,
        "retry_after": 2,
        "code": "replica_failed",
        "message": f"replica {name} failed while serving the request ({type(exc).__name__}); "
        "retry it",
    }


async def relayed(name: str, events: AsyncIterator[Any], load: ReplicaLoad) -> AsyncIterator[Any]:
    """A replica's events, ended by `replica_failed`'s event if the replica fails mid-request
    (the exception would otherwise abort the client's response without a word)."""
    try:
        async for event in events:
            yield event
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # the actor died or its call failed: the client hears of it
        load.mark_failed()
        yield replica_failed(name, exc)


async def watch(
    loads: dict[str, ReplicaLoad],
    fetch: Callable[[str], Awaitable[dict[str, Any]]],
    period_s: float,
) -> None:
    """Keep each replica's kept share current: `fetch(name)` its telemetry every period. A
    replica that does not answer (starting, restarting) keeps the share last seen."""
    while True:
        for name in loads:
            try:
                tel = await asyncio.wait_for(fetch(name), timeout=4 * period_s)
                loads[name].heard(kept_fraction(tel))
                loads[name].recovered()
            except Exception:  # any failure of one replica must not end the loop
                loads[name].mark_failed()
        await asyncio.sleep(period_s)
