"""The reliability campaign, short, on a live app (slow): `rap campaign --duration 60`.

One run of the whole campaign (its own local Ray cluster and app): the load with its bursts at
4 × capacity, the budget shock, a replica actor killed mid-stream, a replica stopped for 10 s,
the controller killed, a storm of disconnects and the device-memory reading failing, each
judged by `rap.ops.campaign`. The 10-minute version is a documented command
(docs/reliability.md)."""

from __future__ import annotations

import gzip
import json

import pytest

pytestmark = pytest.mark.slow


def test_a_short_campaign_holds_every_case(tmp_path, monkeypatch) -> None:
    import os

    from rap.cli.main import main

    monkeypatch.delenv("RAP_API_KEY", raising=False)

    out = tmp_path / "campaign"
    args = ["--duration", "60", "--capacity-s", "10", "--pacing-s", "4"]  # fewer users on 2 cores
    rc = main(["campaign", *args, "--out", str(out)])
    doc = json.loads(gzip.decompress((out / "campaign.json.gz").read_bytes()))
    result = doc["result"]
    failed = [c for c in result["cases"] if not c["ok"]]
    assert rc == 0 and not failed, failed
    names = {c["case"] for c in result["cases"]}
    assert {"kill-replica", "sigstop-replica", "kill-controller", "within budget"} <= names
    assert {"base load", "disconnect-storm"} <= names  # a share answered and TTFT; rows freed
    assert result["outcomes"]["ok"] > 50 and result["memory"]["checked"] > 50
    assert result["outcomes"]["4xx"] > 0  # the invalid bodies reached the server
    assert (out / "timeline.png").stat().st_size > 0 and (out / "campaign.md").exists()
    assert "RAP_API_KEY" not in os.environ  # its key does not leak into the next module's app
