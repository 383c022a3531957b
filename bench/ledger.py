"""The evaluation ledger (`bench/results/ledger.jsonl`, committed): one line per comparison run
of `bench/compare_policies.py`, appended, never rewritten — which split it read, which policy
(by the digest of its weights), the command, the commit and the headline figures. The test split
is read only with `--final`, and only once per policy: a second final run of the same weights is
refused, so that the test figures cannot be tuned on.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

LEDGER = Path(__file__).resolve().parent / "results" / "ledger.jsonl"


def policy_digest(folder: Path) -> str:
    """sha256 of the policy's weights (what makes it the same policy: its metadata, such as
    its provenance, may be written after the runs that chose it)."""
    return hashlib.sha256((folder / "policy.safetensors").read_bytes()).hexdigest()[:16]


def finals(path: Path = LEDGER) -> dict[str, dict[str, Any]]:
    """Final (test-split) runs recorded so far, by policy digest."""
    if not path.is_file():
        return {}
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return {r["policy_digest"]: r for r in rows if r.get("final")}


def check_split(split: str, final: bool, digest: str, path: Path = LEDGER) -> str | None:
    """Why this run may not go ahead, or None."""
    if split == "test" and not final:
        return "the test split is read only by a final run: add --final (once per policy)"
    if final and split != "test":
        return "--final reads the test split: pass --split test"
    if final and digest in finals(path):
        when = finals(path)[digest]["utc"]
        return f"policy {digest} already had its final run ({when}); the test split is read once"
    return None


def append(record: dict[str, Any], path: Path = LEDGER) -> None:
    """Add one run to the ledger, with the time and the commit it ran on."""
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    line = {"utc": now, "commit": commit + ("+dirty" if dirty else ""), **record}
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(line, default=float) + "\n")
