"""Faults on demand, for tests and the reliability campaign; off unless `RAP_FAULT_DIR` is set.

A fault is on while the file `$RAP_FAULT_DIR/<name>` exists, so a test (or an operator drilling
a failure) turns it on and off from outside the replica's process, on any node that shares the
folder. Names: `device_memory` (the device-memory reading — NVML on a GPU — raises), `plan` (a
replica finds every plan it receives malformed).
"""

from __future__ import annotations

import os
from pathlib import Path

FAULTS = ("device_memory", "plan")


class InjectedFault(RuntimeError):
    """Raised where a fault is on."""


def active(name: str) -> bool:
    if name not in FAULTS:
        raise ValueError(f"unknown fault {name!r}; expected one of {', '.join(FAULTS)}")
    folder = os.environ.get("RAP_FAULT_DIR")
    return folder is not None and (Path(folder) / name).exists()


def check(name: str) -> None:
    """Raise `InjectedFault` when the fault `name` is on."""
    if active(name):
        raise InjectedFault(f"injected fault: {name} ($RAP_FAULT_DIR/{name} exists)")
