"""Where `rap train` runs Ray: a local Ray of its own unless told to join a cluster, and one
error line after a bounded wait when that cluster does not answer (no Ray is started here)."""

from __future__ import annotations

import socket
import time

import pytest

from rap.agent import train
from rap.core.errors import RapError


@pytest.fixture
def inits(monkeypatch: pytest.MonkeyPatch) -> list[str | None]:
    import ray

    calls: list[str | None] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda address=None, **_: calls.append(address))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return calls


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # nothing listens once it is closed


def test_without_an_address_it_starts_a_local_ray_not_a_recorded_cluster(inits) -> None:
    """address=None would join the cluster the last `ray start` recorded (even a dead one)."""
    assert train.connect() == "local"
    assert inits == ["local"]


def test_a_cluster_that_does_not_answer_is_one_error_after_a_bounded_wait(
    inits, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{_closed_port()}")
    start = time.monotonic()
    with pytest.raises(RapError, match=r"no Ray cluster answered at 127\.0\.0\.1:\d+ within 2 s"):
        train.connect(timeout_s=2.0)
    assert time.monotonic() - start < 10 and inits == []


def test_a_listening_cluster_is_joined(inits) -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        address = f"127.0.0.1:{server.getsockname()[1]}"
        assert train.connect(address) == address
    assert inits == [address]
    with pytest.raises(RapError, match="not host:port"):
        train.connect("nonsense")
